//! The wire sink of the `NodePort` benchmark's forwarding measurement: an XDP program that drops
//! the frames addressed to one MAC address (counted by the device's `xdp_drops` statistics) and
//! passes every other frame on.
//!
//! Attached in driver mode to the bridge side of node 1's `eth0`, it stands for the wire out of
//! node 1: what node 1 forwards to node 2 is counted and freed there, without the bridge, node 2
//! and the pods, which are the same work in every mode and would dilute the difference between
//! the datapaths under test. Frames to other addresses (an ICMP error to the client, ARP) go on to
//! the bridge and are not counted as forwarded.
//!
//! [`WireSink::forwarder`] is its counterpart for the benchmark's floor: the cheapest XDP
//! forwarder there is, which writes a destination MAC and returns `XDP_TX`.
//!
//! Each program is a dozen instructions, assembled here and wrapped in a minimal ELF object (an
//! `xdp` section with one function symbol, and a `license` section) that aya loads like any
//! other: there is no second eBPF crate to build for the lab, and nothing of this is in rproxy's
//! own object.
use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode, xdp::XdpLink},
};
use object::{
    Architecture, BinaryFormat, Endianness, SectionKind, SymbolFlags, SymbolKind, SymbolScope,
    write::{Object, Symbol, SymbolSection},
};

use crate::netns::in_netns;

/// The program's name (its function symbol).
pub const PROGRAM: &str = "rpx_lab_wire";
/// `XDP_DROP`.
const XDP_DROP: i32 = 1;
/// `XDP_PASS`.
const XDP_PASS: i32 = 2;
/// `XDP_TX`.
const XDP_TX: i32 = 3;

/// One eBPF instruction: opcode, destination and source registers, offset, immediate.
#[derive(Clone, Copy, Debug)]
struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    /// `BPF_LDX | BPF_MEM | size`: `dst = *(size *)(src + off)`.
    const fn load(size: u8, dst: u8, src: u8, off: i16) -> Self {
        Self { code: 0x61 | size, dst, src, off, imm: 0 }
    }

    /// `BPF_ST | BPF_MEM | size`: `*(size *)(dst + off) = imm`.
    const fn store_imm(size: u8, dst: u8, off: i16, imm: i32) -> Self {
        Self { code: 0x62 | size, dst, src: 0, off, imm }
    }

    /// `BPF_ALU64 | BPF_MOV | BPF_K`: `dst = imm`.
    const fn mov_imm(dst: u8, imm: i32) -> Self {
        Self { code: 0xb7, dst, src: 0, off: 0, imm }
    }

    /// `BPF_ALU64 | BPF_MOV | BPF_X`: `dst = src`.
    const fn mov(dst: u8, src: u8) -> Self {
        Self { code: 0xbf, dst, src, off: 0, imm: 0 }
    }

    /// `BPF_ALU64 | BPF_ADD | BPF_K`: `dst += imm`.
    const fn add_imm(dst: u8, imm: i32) -> Self {
        Self { code: 0x07, dst, src: 0, off: 0, imm }
    }

    /// `BPF_JMP | BPF_JGT | BPF_X`: `if dst > src goto +off`.
    const fn jgt(dst: u8, src: u8, off: i16) -> Self {
        Self { code: 0x2d, dst, src, off, imm: 0 }
    }

    /// `BPF_JMP32 | BPF_JNE | BPF_K`: `if (u32)dst != (u32)imm goto +off`.
    const fn jne32_imm(dst: u8, imm: i32, off: i16) -> Self {
        Self { code: 0x56, dst, src: 0, off, imm }
    }

    /// `BPF_JMP | BPF_EXIT`.
    const fn exit() -> Self {
        Self { code: 0x95, dst: 0, src: 0, off: 0, imm: 0 }
    }

    /// The instruction's eight bytes (little-endian eBPF).
    fn encode(self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[0] = self.code;
        out[1] = (self.src << 4) | (self.dst & 0x0f);
        out[2..4].copy_from_slice(&self.off.to_le_bytes());
        out[4..8].copy_from_slice(&self.imm.to_le_bytes());
        out
    }
}

/// `BPF_W` and `BPF_H` for [`Insn::load`].
const WORD: u8 = 0x00;
const HALF: u8 = 0x08;

/// The program: `XDP_DROP` if the frame's destination MAC is `mac`, else `XDP_PASS`.
///
/// ```text
///  0: r2 = *(u32 *)(r1 + 0)        ; xdp_md.data
///  1: r3 = *(u32 *)(r1 + 4)        ; xdp_md.data_end
///  2: r0 = XDP_PASS
///  3: r4 = r2
///  4: r4 += 6
///  5: if r4 > r3 goto 11           ; shorter than a MAC address
///  6: r5 = *(u32 *)(r2 + 0)
///  7: if w5 != mac[0..4] goto 11
///  8: r5 = *(u16 *)(r2 + 4)
///  9: if w5 != mac[4..6] goto 11
/// 10: r0 = XDP_DROP
/// 11: exit
/// ```
fn instructions(mac: [u8; 6]) -> Vec<Insn> {
    let (head, tail) = mac_immediates(mac);
    with_mac_in_bounds(&[
        Insn::load(WORD, 5, 2, 0),
        Insn::jne32_imm(5, head, 3),
        Insn::load(HALF, 5, 2, 4),
        Insn::jne32_imm(5, tail, 1),
        Insn::mov_imm(0, XDP_DROP),
    ])
}

/// Instructions 0–5 of both programs, then `body`, then `exit`: `r2` = data, `r3` = data end,
/// `r0` = `XDP_PASS`, and a frame shorter than a MAC address jumps over `body` to the exit.
fn with_mac_in_bounds(body: &[Insn]) -> Vec<Insn> {
    let skip = i16::try_from(body.len()).expect("a body of a few instructions");
    let mut insns = vec![
        Insn::load(WORD, 2, 1, 0),
        Insn::load(WORD, 3, 1, 4),
        Insn::mov_imm(0, XDP_PASS),
        Insn::mov(4, 2),
        Insn::add_imm(4, 6),
        Insn::jgt(4, 3, skip),
    ];
    insns.extend_from_slice(body);
    insns.push(Insn::exit());
    insns
}

/// The forwarder: writes `mac` as the frame's destination and returns `XDP_TX`.
///
/// ```text
/// 0: r2 = *(u32 *)(r1 + 0)         ; xdp_md.data
/// 1: r3 = *(u32 *)(r1 + 4)         ; xdp_md.data_end
/// 2: r0 = XDP_PASS
/// 3: r4 = r2
/// 4: r4 += 6
/// 5: if r4 > r3 goto 9             ; shorter than a MAC address
/// 6: *(u32 *)(r2 + 0) = mac[0..4]
/// 7: *(u16 *)(r2 + 4) = mac[4..6]
/// 8: r0 = XDP_TX
/// 9: exit
/// ```
fn forwarder_instructions(mac: [u8; 6]) -> Vec<Insn> {
    let (head, tail) = mac_immediates(mac);
    with_mac_in_bounds(&[
        Insn::store_imm(WORD, 2, 0, head),
        Insn::store_imm(HALF, 2, 4, tail),
        Insn::mov_imm(0, XDP_TX),
    ])
}

/// A MAC address as the immediates of a 4-byte and a 2-byte access to it (little-endian).
fn mac_immediates(mac: [u8; 6]) -> (i32, i32) {
    (i32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]), i32::from(u16::from_le_bytes([mac[4], mac[5]])))
}

/// An ELF object holding `insns` as function [`PROGRAM`] in section `xdp`.
fn elf(insns: Vec<Insn>) -> Result<Vec<u8>> {
    let code: Vec<u8> = insns.into_iter().flat_map(Insn::encode).collect();
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::Bpf, Endianness::Little);
    let text = obj.add_section(Vec::new(), b"xdp".to_vec(), SectionKind::Text);
    let offset = obj.append_section_data(text, &code, 8);
    obj.add_symbol(Symbol {
        name: PROGRAM.as_bytes().to_vec(),
        value: offset,
        size: code.len() as u64,
        kind: SymbolKind::Text,
        scope: SymbolScope::Dynamic,
        weak: false,
        section: SymbolSection::Section(text),
        flags: SymbolFlags::None,
    });
    let license = obj.add_section(Vec::new(), b"license".to_vec(), SectionKind::Data);
    obj.append_section_data(license, b"GPL\0", 1);
    obj.write().context("writing the wire sink's ELF object")
}

/// The loaded wire sink (or forwarder).
pub struct WireSink {
    ebpf: Ebpf,
}

impl std::fmt::Debug for WireSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(PROGRAM)
    }
}

impl WireSink {
    /// Loads (and verifies) the program that drops frames to `mac`.
    pub fn load(mac: [u8; 6]) -> Result<Self> {
        Self::load_program(instructions(mac))
    }

    /// Loads (and verifies) the forwarder that sends every frame back out to `mac` (see the
    /// module doc).
    pub fn forwarder(mac: [u8; 6]) -> Result<Self> {
        Self::load_program(forwarder_instructions(mac))
    }

    fn load_program(insns: Vec<Insn>) -> Result<Self> {
        let mut ebpf = Ebpf::load(&elf(insns)?).context("parsing the wire sink's object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .with_context(|| format!("no {PROGRAM} in the wire sink's object"))?
            .try_into()
            .context("the wire sink is not an XDP program")?;
        prog.load().context("loading the wire sink")?;
        Ok(Self { ebpf })
    }

    /// The loaded program.
    pub fn program(&mut self) -> Result<&mut Xdp> {
        let prog = self.ebpf.program_mut(PROGRAM).with_context(|| format!("no {PROGRAM}"))?;
        prog.try_into().context("the wire sink is not an XDP program")
    }

    /// Attaches the program in driver mode to device `ifname` of namespace `ns`. The link
    /// detaches when dropped, or when the device is deleted.
    pub fn attach_native(&mut self, ns: &str, ifname: &str) -> Result<XdpLink> {
        let prog = self.program()?;
        let id = in_netns(ns, || prog.attach(ifname, XdpMode::Driver))?
            .with_context(|| format!("attaching {PROGRAM} to {ifname} in netns {ns} (driver mode)"))?;
        prog.take_link(id).context("taking the XDP link")
    }
}

/// The frames `ns`'s device `dev` dropped and passed in XDP (`ethtool -S`: every queue's
/// `xdp_drops`, and `xdp_packets` less those).
pub fn xdp_verdicts(ns: &str, dev: &str) -> Result<(u64, u64)> {
    let stats = crate::netns::ethtool_stats(ns, dev)?;
    let sum = |suffix: &str| stats.iter().filter(|(k, _)| k.ends_with(suffix)).map(|(_, v)| v).sum::<u64>();
    let (drops, packets) = (sum("_xdp_drops"), sum("_xdp_packets"));
    Ok((drops, packets.saturating_sub(drops)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_registers_offsets_and_immediates() {
        let insns = instructions([0x02, 0x00, 0x00, 0x00, 0x00, 0x02]);
        assert_eq!(insns.len(), 12);
        // r2 = *(u32 *)(r1 + 0): dst in the low nibble, src in the high one.
        assert_eq!(insns[0].encode(), [0x61, 0x12, 0, 0, 0, 0, 0, 0]);
        // if r4 > r3 goto +5 lands on the exit.
        assert_eq!(insns[5].encode(), [0x2d, 0x34, 5, 0, 0, 0, 0, 0]);
        assert_eq!(5 + 5 + 1, insns.len() - 1);
        // The MAC's first four bytes as they load from the packet (little-endian).
        assert_eq!(insns[7].encode(), [0x56, 0x05, 3, 0, 0x02, 0, 0, 0]);
        assert_eq!(insns[8].encode(), [0x69, 0x25, 4, 0, 0, 0, 0, 0]);
        assert_eq!(insns[9].encode(), [0x56, 0x05, 1, 0, 0, 0x02, 0, 0]);
        assert_eq!(insns[11].encode(), [0x95, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn forwarder_stores_the_mac_and_jumps_to_the_exit() {
        let insns = forwarder_instructions([0x02, 0x00, 0x00, 0x00, 0x00, 0x02]);
        assert_eq!(insns.len(), 10);
        assert_eq!(insns[5].encode(), [0x2d, 0x34, 3, 0, 0, 0, 0, 0], "if r4 > r3 goto 9");
        assert_eq!(insns[6].encode(), [0x62, 0x02, 0, 0, 0x02, 0, 0, 0], "*(u32 *)(r2 + 0) = 02:00:00:00");
        assert_eq!(insns[7].encode(), [0x6a, 0x02, 4, 0, 0, 0x02, 0, 0], "*(u16 *)(r2 + 4) = 00:02");
        assert_eq!(insns[8].encode(), [0xb7, 0x00, 0, 0, 3, 0, 0, 0], "r0 = XDP_TX");
    }
}
