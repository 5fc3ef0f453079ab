//! The datapath fuzzer (`common::fuzz`) with a fixed seed: 100,000 frames through every program,
//! every property checked (`cargo xtask fuzz-datapath --frames N` runs it longer, seed chosen).
use crate::common::{SERIAL, fuzz, harness, node_netns};

/// The suite's seed; a failure prints it with the frame number.
const SEED: u64 = 0x5eed_2026_1203;
const FRAMES: u64 = 100_000;

#[test]
fn fuzzed_frames_keep_every_property() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(mut h) = harness() else { return };
    let result = std::thread::spawn(move || {
        let ifindex = node_netns::enter("nsx", "nsy");
        fuzz::run(&mut h, ifindex, SEED, FRAMES)
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    match result {
        Ok(r) => {
            eprintln!("{r:?}");
            assert_eq!(r.frames, FRAMES);
            assert!(r.changed > FRAMES / 20, "too few frames translated for the run to mean much: {r:?}");
        }
        Err(f) => panic!("seed {SEED:#x}, frame {}: {}", f.frame_no, f.what),
    }
}
