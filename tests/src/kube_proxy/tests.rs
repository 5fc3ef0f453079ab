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

/// Every table's rules belong to declared or built-in chains, and every jump targets a declared
/// chain or one of `targets`.
fn assert_jumps_are_declared(tables: &Tables, targets: &[&str]) {
    assert_eq!(tables.keys().collect::<Vec<_>>(), ["filter", "nat"]);
    for (name, (declared, chains)) in tables {
        for (chain, rules) in chains {
            let builtin = ["PREROUTING", "OUTPUT", "POSTROUTING", "FORWARD"].contains(&chain.as_str());
            assert!(builtin || declared.contains(chain), "{name}: rules for undeclared chain {chain}");
            for rule in rules {
                let t = target(rule);
                assert!(
                    declared.iter().any(|d| d == t) || targets.contains(&t),
                    "{name}/{chain}: jump to undeclared {t} in {rule:?}"
                );
            }
        }
    }
}

#[test]
fn iptables_every_jump_targets_a_declared_chain_or_a_builtin_target() {
    let frontends = [tcp_frontend(vec![ep(11, 8080), ep(12, 8080)]), udp_frontend(vec![ep(13, 53)])];
    let tables = parse_restore(&iptables_rules(&frontends));
    assert_jumps_are_declared(&tables, &["RETURN", "MARK", "MASQUERADE", "DNAT", "DROP", "ACCEPT"]);
    for (name, (declared, chains)) in &tables {
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

/// kube-proxy's settings of the `ClusterIP` tests: pods in 10.244.0.0/16, Services in 10.96.0.0/16.
const CONFIG: ClusterIpConfig = ClusterIpConfig {
    cluster_cidr: Ipv4Cidr::new(Ipv4Addr::new(10, 244, 0, 0), 16),
    service_cidr: Ipv4Cidr::new(Ipv4Addr::new(10, 96, 0, 0), 16),
};

/// `ClusterIP` TCP frontend `ns/svc-<n>:web` on 10.96.1.<n>:80 with `endpoints`.
fn cluster_ip_frontend(n: u8, endpoints: Vec<SocketAddrV4>) -> Frontend {
    Frontend {
        service: format!("svc-{n}"),
        cluster_ip: Ipv4Addr::new(10, 96, 1, n),
        node_port: 0,
        ..tcp_frontend(endpoints)
    }
}

#[test]
fn cluster_ip_iptables_jumps_target_declared_chains() {
    let frontends = [
        cluster_ip_frontend(1, vec![ep(11, 8080)]),
        cluster_ip_frontend(2, vec![ep(11, 8080), ep(12, 8080), ep(13, 8080)]),
        cluster_ip_frontend(3, Vec::new()),
    ];
    let tables = parse_restore(&cluster_ip_iptables_rules(&frontends, CONFIG));
    assert_jumps_are_declared(&tables, &["RETURN", "MARK", "MASQUERADE", "DNAT", "DROP", "ACCEPT", "REJECT"]);
    // Chains of Services: only for those with endpoints, one SEP chain per endpoint.
    let nat = &tables["nat"].0;
    assert_eq!(nat.iter().filter(|c| c.starts_with("KUBE-SVC-")).count(), 2);
    assert_eq!(nat.iter().filter(|c| c.starts_with("KUBE-SEP-")).count(), 4);
    assert!(!nat.iter().any(|c| c.starts_with("KUBE-EXT-")), "no external chains for ClusterIP Services");
}

#[test]
fn cluster_ip_iptables_has_kube_proxys_cluster_ip_path() {
    let eps = vec![ep(11, 8080), ep(12, 8080)];
    let frontends = [cluster_ip_frontend(7, vec![ep(13, 8080)]), cluster_ip_frontend(1, eps.clone())];
    let tables = parse_restore(&cluster_ip_iptables_rules(&frontends, CONFIG));
    let nat = &tables["nat"].1;
    for hook in ["PREROUTING", "OUTPUT"] {
        assert_eq!(nat[hook].iter().map(|r| target(r)).collect::<Vec<_>>(), ["KUBE-SERVICES"]);
    }
    assert_eq!(target(&nat["POSTROUTING"][0]), "KUBE-POSTROUTING");

    // One rule per Service in the order given, then the node ports.
    let services = &nat["KUBE-SERVICES"];
    assert_eq!(services.len(), 3);
    assert!(services[0].contains("ns/svc-7:web cluster IP\" -m tcp -p tcp -d 10.96.1.7/32 --dport 80 -j KUBE-SVC-"));
    assert!(services[1].contains("ns/svc-1:web cluster IP\" -m tcp -p tcp -d 10.96.1.1/32 --dport 80 -j KUBE-SVC-"));
    assert!(services[2].ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"), "{}", services[2]);
    assert!(!nat.contains_key("KUBE-NODEPORTS"), "no node ports");

    // Off-cluster sources are marked first, then an endpoint is picked.
    let svc = target(&services[1]);
    let svc_rules = &nat[svc];
    assert_eq!(svc_rules.len(), 3);
    assert!(
        svc_rules[0].ends_with("-m tcp -p tcp -d 10.96.1.1/32 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"),
        "{}",
        svc_rules[0]
    );
    assert!(svc_rules[1].contains("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-"));
    assert!(!svc_rules[2].contains("statistic"));
    for (rule, e) in svc_rules[1..].iter().zip(&eps) {
        let sep = &nat[target(rule)];
        assert!(sep[0].ends_with(&format!("-s {}/32 -j KUBE-MARK-MASQ", e.ip())), "hairpin: {}", sep[0]);
        assert!(sep[1].ends_with(&format!("-m tcp -p tcp -j DNAT --to-destination {e}")), "{}", sep[1]);
    }
    assert_eq!(nat["KUBE-MARK-MASQ"], ["-j MARK --or-mark 0x4000"]);
    assert_eq!(nat["KUBE-POSTROUTING"].len(), 3);

    // The forward path: firewall, forwarding rules, service portals, external portals.
    let filter = &tables["filter"].1;
    assert_eq!(
        filter["FORWARD"].iter().map(|r| target(r)).collect::<Vec<_>>(),
        ["KUBE-PROXY-FIREWALL", "KUBE-FORWARD", "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES"]
    );
    assert!(filter["FORWARD"][0].starts_with("-m conntrack --ctstate NEW "));
    assert_eq!(filter["KUBE-FORWARD"].len(), 3);
    assert!(!filter.contains_key("KUBE-SERVICES"), "every Service has endpoints: nothing to reject");
}

#[test]
fn cluster_ip_iptables_rejects_services_without_endpoints() {
    let frontends = [cluster_ip_frontend(3, Vec::new())];
    let tables = parse_restore(&cluster_ip_iptables_rules(&frontends, CONFIG));
    let nat = &tables["nat"].1;
    assert_eq!(nat["KUBE-SERVICES"].len(), 1, "only the node ports rule");
    assert_eq!(
        tables["filter"].1["KUBE-SERVICES"],
        ["-m comment --comment \"ns/svc-3:web has no endpoints\" -m tcp -p tcp -d 10.96.1.3/32 --dport 80 -j REJECT"]
    );
}

#[test]
fn cluster_ip_iptables_removal_unhooks_flushes_and_deletes_every_chain() {
    let frontends = [cluster_ip_frontend(1, vec![ep(11, 8080)]), cluster_ip_frontend(2, Vec::new())];
    let rules = parse_restore(&cluster_ip_iptables_rules(&frontends, CONFIG));
    let removal = cluster_ip_iptables_removal(&frontends);
    for (table, (declared, _)) in &rules {
        let section = removal
            .split_inclusive("COMMIT\n")
            .find(|s| s.starts_with(&format!("*{table}\n")))
            .unwrap_or_else(|| panic!("no {table} section in:\n{removal}"));
        for chain in declared {
            assert!(section.contains(&format!("\n:{chain} - [0:0]\n")), "{chain} not flushed");
            assert!(section.contains(&format!("\n-X {chain}\n")), "{chain} not deleted");
        }
    }
    for (table, chain, rule) in CLUSTER_IP_JUMPS {
        assert!(removal.contains(&format!("-D {chain} {rule}\n")), "{table}: {chain} jump not removed");
        assert!(rules[table].1[chain].contains(&rule.to_owned()), "{table}: {chain} jump not installed");
    }
}

#[test]
fn cluster_ip_nftables_has_kube_proxys_cluster_ip_path() {
    let eps = vec![ep(11, 8080), ep(12, 8080)];
    let (f, empty) = (cluster_ip_frontend(1, eps.clone()), cluster_ip_frontend(2, Vec::new()));
    let text = cluster_ip_nftables_rules(&[f.clone(), empty.clone()], CONFIG);
    assert!(text.starts_with("table ip kube-proxy-bench {\n"));
    assert_eq!(text.matches('{').count(), text.matches('}').count(), "unbalanced braces:\n{text}");
    for hook in [
        "type filter hook prerouting priority -110; policy accept;\n\t\tct state new jump firewall-check",
        "type filter hook forward priority -110; policy accept;\n\t\tct state new jump service-endpoints-check\n\t\t\
         ct state new jump cluster-ips-check",
        "type nat hook prerouting priority dstnat; policy accept;\n\t\tjump services",
        "type nat hook output priority -100; policy accept;\n\t\tjump services",
        "type nat hook postrouting priority srcnat; policy accept;\n\t\tjump masquerading",
    ] {
        assert!(text.contains(hook), "missing {hook:?} in:\n{text}");
    }
    assert!(text.contains("set cluster-ips {\n\t\ttype ipv4_addr\n\t\telements = { 10.96.1.1,\n\t\t\t10.96.1.2 }"));
    assert!(text.contains("ip daddr @cluster-ips reject\n\t\tip daddr { 10.96.0.0/16 } drop"));
    assert!(text.contains("ip daddr . meta l4proto . th dport vmap @service-ips"));

    let base = f.nft_base();
    assert!(text.contains(&format!("elements = {{ 10.96.1.1 . tcp . 80 : goto service-{base} }}")), "{text}");
    assert!(!text.contains(&format!("goto service-{}", empty.nft_base())), "no service chain without endpoints");
    assert!(text.contains("elements = { 10.96.1.2 . tcp . 80 : goto reject-chain }"));
    assert!(text.contains("chain reject-chain {\n\t\treject\n\t}"));
    let picks: Vec<String> =
        eps.iter().enumerate().map(|(i, &e)| format!("{i} : goto {}", f.nft_endpoint(e))).collect();
    assert!(text.contains(&format!(
        "chain service-{base} {{\n\t\tip daddr 10.96.1.1 tcp dport 80 ip saddr != 10.244.0.0/16 jump \
         mark-for-masquerade\n\t\tnumgen random mod 2 vmap {{ {} }}\n\t}}",
        picks.join(", ")
    )));
    for e in &eps {
        assert!(text.contains(&format!(
            "chain {} {{\n\t\tip saddr {} jump mark-for-masquerade\n\t\tmeta l4proto tcp dnat to {e}\n\t}}",
            f.nft_endpoint(*e),
            e.ip()
        )));
    }
    assert!(!text.contains("external-"), "no external chains for ClusterIP Services");
}

#[test]
fn cidrs_clear_host_bits_and_contain_their_addresses() {
    let cidr = Ipv4Cidr::new(Ipv4Addr::new(10, 244, 7, 9), 16);
    assert_eq!(cidr.to_string(), "10.244.0.0/16");
    assert!(cidr.contains(Ipv4Addr::new(10, 244, 255, 255)));
    assert!(!cidr.contains(Ipv4Addr::new(10, 245, 0, 0)));
    assert_eq!(Ipv4Cidr::new(Ipv4Addr::new(1, 2, 3, 4), 40).to_string(), "1.2.3.4/32");
    assert!(Ipv4Cidr::new(Ipv4Addr::new(1, 2, 3, 4), 0).contains(Ipv4Addr::new(200, 1, 1, 1)));
    assert_eq!(Ipv4Cidr::new(Ipv4Addr::new(1, 2, 3, 4), 0).to_string(), "0.0.0.0/0");
}

#[test]
fn cluster_ip_frontends_resolve_target_ports() {
    let service = crate::manifest::Service {
        namespace: "ns".into(),
        name: "svc".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 20),
        ports: vec![ServicePort {
            name: "web".into(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: TargetPort::Name("http".into()),
        }],
    };
    let slice = EndpointSlice {
        namespace: "ns".into(),
        name: "svc-1".into(),
        service_name: "svc".into(),
        endpoints: vec![Endpoint::ready(Ipv4Addr::new(10, 244, 1, 11), "node-1")],
        ports: vec![EndpointPort { name: "http".into(), protocol: Protocol::Tcp, port: 8080 }],
    };
    let got = cluster_ip_frontends(&service, &slice).expect("frontends");
    assert_eq!(got, [Frontend { node_port: 0, ..tcp_frontend(vec![ep(11, 8080)]) }]);
}
