//! The `NodePort` benchmark's wire sink (`rproxy_tests::wire`) through `BPF_PROG_TEST_RUN`: it
//! drops exactly the frames addressed to its MAC. Needs root (skipped otherwise).
use aya::programs::{TestRun as _, TestRunOptions};
use rproxy_tests::{serial_or_skip, wire::WireSink};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// The verdict of `prog` on `frame`, and the frame after it.
fn run(prog: &mut WireSink, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let result = prog
        .program()
        .unwrap()
        .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::default() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

fn verdict(prog: &mut WireSink, frame: &[u8]) -> u32 {
    run(prog, frame).0
}

#[test]
fn forwarder_writes_the_mac_and_transmits() {
    let Some(_serial) = serial_or_skip("forwarder_writes_the_mac_and_transmits") else { return };
    let mac = [0xfe, 0x11, 0x22, 0x33, 0x44, 0x85];
    let mut fwd = WireSink::forwarder(mac).expect("loading the forwarder");
    let mut frame = [0x5au8; 60];
    frame[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    let (rc, out) = run(&mut fwd, &frame);
    assert_eq!(rc, XDP_TX);
    assert_eq!(out[..6], mac, "destination MAC written");
    assert_eq!(out[6..], frame[6..], "the rest unchanged");
}

#[test]
fn wire_sink_drops_only_frames_to_its_mac() {
    let Some(_serial) = serial_or_skip("wire_sink_drops_only_frames_to_its_mac") else { return };
    // Every byte of the address matters, including ones with the high bit set.
    for mac in [[0x02, 0x11, 0x22, 0x33, 0x44, 0x55], [0xfe, 0xff, 0xff, 0xff, 0xff, 0xfe]] {
        let mut sink = WireSink::load(mac).expect("loading the wire sink");
        let mut frame = [0u8; 60];
        frame[..6].copy_from_slice(&mac);
        frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x64]);
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(verdict(&mut sink, &frame), XDP_DROP, "frame to {mac:02x?}");
        for byte in 0..6 {
            let mut other = frame;
            other[byte] ^= 0x01;
            assert_eq!(verdict(&mut sink, &other), XDP_PASS, "frame to {:02x?}", &other[..6]);
        }
        let broadcast = [[0xff; 6].as_slice(), &frame[6..]].concat();
        assert_eq!(verdict(&mut sink, &broadcast), XDP_PASS, "broadcast");
    }
}
