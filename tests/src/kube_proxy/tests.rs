use std::collections::BTreeMap;

use super::*;
use crate::manifest::{Endpoint, EndpointPort, NodePortServicePort, ServicePort};

fn ep(last: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, last), port)
}

/// `ns/svc`, TCP port `web` 80 → 8080 on node port 30080, with `endpoints`.
fn tcp_frontend(endpoints: Vec<SocketAddrV4>) -> Frontend {
    Frontend {
        namespace: "ns".into(),
        service: "svc".into(),
        port_name: "web".into(),
        protocol: Protocol::Tcp,
        cluster_ip: Ipv4Addr::new(10, 96, 0, 20),
        port: 80,
        node_port: 30080,
        endpoints,
    }
}

fn udp_frontend(endpoints: Vec<SocketAddrV4>) -> Frontend {
    Frontend { port_name: "dns".into(), protocol: Protocol::Udp, node_port: 30053, port: 53, ..tcp_frontend(endpoints) }
}

/// An `iptables-restore` text as table → (declared chains, chain → rules without `-A chain`).
type Tables = BTreeMap<String, (Vec<String>, BTreeMap<String, Vec<String>>)>;

fn parse_restore(text: &str) -> Tables {
    let mut tables = Tables::new();
    let mut table = String::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_owned();
            tables.entry(table.clone()).or_default();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().expect("chain name");
            tables.get_mut(&table).expect("table").0.push(chain.to_owned());
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, rest) = rule.split_once(' ').expect("rule body");
            tables.get_mut(&table).expect("table").1.entry(chain.to_owned()).or_default().push(rest.to_owned());
        } else {
            assert_eq!(line, "COMMIT", "unexpected line {line:?}");
        }
    }
    tables
}

/// The `-j` target of a rule.
fn target(rule: &str) -> &str {
    rule.rsplit_once("-j ").expect("a -j target").1.split_whitespace().next().expect("target")
}

#[test]
fn iptables_every_jump_targets_a_declared_chain_or_a_builtin_target() {
    let frontends = [tcp_frontend(vec![ep(11, 8080), ep(12, 8080)]), udp_frontend(vec![ep(13, 53)])];
    let tables = parse_restore(&iptables_rules(&frontends));
    assert_eq!(tables.keys().collect::<Vec<_>>(), ["filter", "nat"]);
    for (name, (declared, chains)) in &tables {
        for (chain, rules) in chains {
            let builtin = ["PREROUTING", "OUTPUT", "POSTROUTING", "FORWARD"].contains(&chain.as_str());
            assert!(builtin || declared.contains(chain), "{name}: rules for undeclared chain {chain}");
            for rule in rules {
                let t = target(rule);
                assert!(
                    declared.iter().any(|d| d == t)
                        || ["RETURN", "MARK", "MASQUERADE", "DNAT", "DROP", "ACCEPT"].contains(&t),
                    "{name}/{chain}: jump to undeclared {t} in {rule:?}"
                );
            }
        }
        // Every declared chain is used (has rules).
        for chain in declared {
            assert!(chains.contains_key(chain), "{name}: {chain} declared but empty");
        }
    }
}

#[test]
fn iptables_has_kube_proxys_nodeport_path() {
    let eps = vec![ep(11, 8080), ep(12, 8080), SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 11), 8080)];
    let f = tcp_frontend(eps.clone());
    let tables = parse_restore(&iptables_rules(std::slice::from_ref(&f)));
    let nat = &tables["nat"].1;

    for hook in ["PREROUTING", "OUTPUT"] {
        assert_eq!(nat[hook].iter().map(|r| target(r)).collect::<Vec<_>>(), ["KUBE-SERVICES"]);
    }
    assert_eq!(target(&nat["POSTROUTING"][0]), "KUBE-POSTROUTING");

    let services = &nat["KUBE-SERVICES"];
    assert_eq!(services.len(), 2);
    assert!(services[0].contains("-m tcp -p tcp -d 10.96.0.20/32 --dport 80 -j KUBE-SVC-"), "{}", services[0]);
    assert!(
        services[1].ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"),
        "the last KUBE-SERVICES rule must send local destinations to KUBE-NODEPORTS: {}",
        services[1]
    );
    let svc = target(&services[0]).to_owned();

    let nodeports = &nat["KUBE-NODEPORTS"];
    assert_eq!(nodeports.len(), 1);
    assert!(nodeports[0].contains("-m tcp -p tcp --dport 30080 -j KUBE-EXT-"), "{}", nodeports[0]);
    let ext = target(&nodeports[0]);
    assert_eq!(nat[ext].iter().map(|r| target(r)).collect::<Vec<_>>(), ["KUBE-MARK-MASQ", svc.as_str()]);

    // 1/3, 1/2, then the rest: each endpoint equally likely.
    let svc_rules = &nat[&svc];
    assert_eq!(svc_rules.len(), 3);
    assert!(svc_rules[0].contains("-m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-"));
    assert!(svc_rules[1].contains("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-"));
    assert!(!svc_rules[2].contains("statistic"));
    let seps: Vec<&str> = svc_rules.iter().map(|r| target(r)).collect();
    for (sep, e) in seps.iter().zip(&eps) {
        let rules = &nat[*sep];
        assert!(rules[0].ends_with(&format!("-s {}/32 -j KUBE-MARK-MASQ", e.ip())), "hairpin: {}", rules[0]);
        assert!(rules[1].ends_with(&format!("-m tcp -p tcp -j DNAT --to-destination {e}")), "{}", rules[1]);
    }
    let distinct: std::collections::BTreeSet<&str> = seps.iter().copied().collect();
    assert_eq!(distinct.len(), 3, "one chain per endpoint: {seps:?}");

    assert_eq!(nat["KUBE-MARK-MASQ"], ["-j MARK --or-mark 0x4000"]);
    let post = &nat["KUBE-POSTROUTING"];
    assert_eq!(post[0], "-m mark ! --mark 0x4000/0x4000 -j RETURN");
    assert_eq!(post[1], "-j MARK --xor-mark 0x4000");
    assert!(post[2].ends_with("-j MASQUERADE --random-fully"));

    let filter = &tables["filter"].1;
    assert_eq!(target(&filter["FORWARD"][0]), "KUBE-FORWARD");
    assert_eq!(filter["KUBE-FORWARD"].iter().map(|r| target(r)).collect::<Vec<_>>(), ["DROP", "ACCEPT", "ACCEPT"]);
}

#[test]
fn iptables_udp_port_dnats_over_udp() {
    let tables = parse_restore(&iptables_rules(&[udp_frontend(vec![ep(13, 53)])]));
    let nat = &tables["nat"].1;
    assert!(nat["KUBE-NODEPORTS"][0].contains("-m udp -p udp --dport 30053 -j KUBE-EXT-"));
    let svc = target(&nat["KUBE-SERVICES"][0]);
    assert_eq!(nat[svc].len(), 1, "a single endpoint needs no statistic match");
    assert!(!nat[svc][0].contains("statistic"));
    let sep = target(&nat[svc][0]);
    assert!(nat[sep][1].ends_with("-m udp -p udp -j DNAT --to-destination 10.244.1.13:53"));
}

#[test]
fn iptables_removal_unhooks_flushes_and_deletes_every_chain() {
    let frontends = [tcp_frontend(vec![ep(11, 8080), ep(12, 8080)])];
    let rules = parse_restore(&iptables_rules(&frontends));
    let removal = iptables_removal(&frontends);
    for (table, (declared, _)) in &rules {
        let section: String = removal
            .split_inclusive("COMMIT\n")
            .find(|s| s.starts_with(&format!("*{table}\n")))
            .unwrap_or_else(|| panic!("no {table} section in:\n{removal}"))
            .to_owned();
        let lines: Vec<&str> = section.lines().collect();
        let first_decl = lines.iter().position(|l| l.starts_with(':')).expect("declarations");
        let first_delete = lines.iter().position(|l| l.starts_with("-X ")).expect("deletions");
        assert!(lines[1..first_decl].iter().all(|l| l.starts_with("-D ")), "jumps are removed first:\n{section}");
        assert!(first_decl < first_delete, "chains are flushed before any is deleted:\n{section}");
        for chain in declared {
            assert!(lines.contains(&format!(":{chain} - [0:0]").as_str()), "{chain} not flushed");
            assert!(lines.contains(&format!("-X {chain}").as_str()), "{chain} not deleted");
        }
    }
    // The -D lines repeat the jump rules exactly.
    for (table, chain, rule) in IPT_JUMPS {
        assert!(removal.contains(&format!("-D {chain} {rule}\n")), "{table}: {chain} jump not removed");
        assert!(rules[table].1[chain].contains(&rule.to_owned()));
    }
}

#[test]
fn nftables_has_kube_proxys_nodeport_path() {
    let eps = vec![ep(11, 8080), ep(12, 8080), SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 11), 8080)];
    let f = tcp_frontend(eps.clone());
    let text = nftables_rules(std::slice::from_ref(&f), &[Ipv4Addr::new(172, 31, 0, 1)]);
    assert!(text.starts_with("table ip kube-proxy-bench {\n"));
    assert_eq!(text.matches('{').count(), text.matches('}').count(), "unbalanced braces:\n{text}");
    for hook in [
        "type nat hook prerouting priority dstnat; policy accept;\n\t\tjump services",
        "type nat hook output priority -100; policy accept;\n\t\tjump services",
        "type nat hook postrouting priority srcnat; policy accept;\n\t\tjump masquerading",
        "type filter hook forward priority filter - 10; policy accept;\n\t\tct state new jump service-endpoints-check",
    ] {
        assert!(text.contains(hook), "missing {hook:?} in:\n{text}");
    }
    assert!(text.contains("elements = { 172.31.0.1 }"));
    assert!(text.contains("ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"));

    let base = f.nft_base();
    assert!(base.ends_with("-ns/svc/tcp/web"), "{base}");
    assert!(text.contains(&format!("10.96.0.20 . tcp . 80 : goto service-{base}")));
    assert!(text.contains(&format!("tcp . 30080 : goto external-{base}")));
    assert!(
        text.contains(&format!(
            "chain external-{base} {{\n\t\tjump mark-for-masquerade\n\t\tgoto service-{base}\n\t}}"
        ))
    );
    let picks: Vec<String> =
        eps.iter().enumerate().map(|(i, &e)| format!("{i} : goto {}", f.nft_endpoint(e))).collect();
    assert!(text.contains(&format!("numgen random mod 3 vmap {{ {} }}", picks.join(", "))), "{text}");
    for e in &eps {
        let chain = f.nft_endpoint(*e);
        assert!(chain.ends_with(&format!("__{}/{}", e.ip(), e.port())), "{chain}");
        assert!(text.contains(&format!(
            "chain {chain} {{\n\t\tip saddr {} jump mark-for-masquerade\n\t\tmeta l4proto tcp dnat to {e}\n\t}}",
            e.ip()
        )));
    }
    assert!(text.contains("meta mark set meta mark | 0x00004000"));
    assert!(text.contains(
        "meta mark & 0x00004000 == 0 return\n\t\tmeta mark set meta mark ^ 0x00004000\n\t\tmasquerade fully-random"
    ));
    assert_eq!(nftables_removal(), "delete table ip kube-proxy-bench\n");
}

#[test]
fn nftables_service_without_endpoints_drops() {
    let text = nftables_rules(&[udp_frontend(Vec::new())], &[Ipv4Addr::new(172, 31, 0, 1)]);
    assert!(text.contains(&format!("chain service-{} {{\n\t\tdrop\n\t}}", udp_frontend(Vec::new()).nft_base())));
    assert!(!text.contains("numgen"));
}

#[test]
fn frontends_resolve_target_ports_and_keep_ready_endpoints() {
    let service = NodePortService {
        namespace: "ns".into(),
        name: "svc".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 20),
        ports: vec![
            NodePortServicePort {
                port: ServicePort { name: "web".into(), protocol: Protocol::Tcp, port: 80, target_port: 8080.into() },
                node_port: 30080,
            },
            NodePortServicePort {
                port: ServicePort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53,
                    target_port: TargetPort::Name("dns-port".into()),
                },
                node_port: 30053,
            },
        ],
    };
    let mut not_ready = Endpoint::ready(Ipv4Addr::new(10, 244, 1, 99), "node-1");
    not_ready.ready = false;
    let slice = EndpointSlice {
        namespace: "ns".into(),
        name: "svc-1".into(),
        service_name: "svc".into(),
        endpoints: vec![Endpoint::ready(Ipv4Addr::new(10, 244, 1, 11), "node-1"), not_ready],
        ports: vec![EndpointPort { name: "dns-port".into(), protocol: Protocol::Udp, port: 5353 }],
    };
    let got = frontends(&service, &slice).expect("frontends");
    assert_eq!(got[0], tcp_frontend(vec![ep(11, 8080)]));
    assert_eq!(got[1].endpoints, [ep(11, 5353)]);
    assert_eq!((got[1].protocol, got[1].node_port, got[1].port_name()), (Protocol::Udp, 30053, "ns/svc:dns".into()));

    let mut unnamed = slice;
    unnamed.ports.clear();
    assert!(frontends(&service, &unnamed).is_err(), "a named target port without a slice port is an error");
}

#[test]
fn chain_hashes_are_stable_and_distinct() {
    let f = tcp_frontend(vec![ep(11, 8080), ep(12, 8080)]);
    assert_eq!(f.svc_chain(), tcp_frontend(Vec::new()).svc_chain(), "endpoints do not change the service chain");
    let names =
        [f.svc_chain(), udp_frontend(Vec::new()).svc_chain(), f.sep_chain(ep(11, 8080)), f.sep_chain(ep(12, 8080))];
    for (i, a) in names.iter().enumerate() {
        assert_eq!(a.len(), "KUBE-SVC-".len() + 16, "{a}");
        assert!(a.bytes().skip(9).all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b)), "{a}");
        for b in &names[i + 1..] {
            assert_ne!(a[9..], b[9..]);
        }
    }
    assert_eq!(hash(&["a"], 16), hash(&["a"], 16));
    assert_ne!(hash(&["ab", "c"], 16), hash(&["a", "bc"], 16), "parts are separated");
}

#[test]
fn probabilities_are_one_over_the_endpoints_left() {
    assert_eq!(probability(4, 0), "0.2500000000");
    assert_eq!(probability(4, 2), "0.5000000000");
    assert_eq!(probability(3, 0), "0.3333333333");
}
