//! `cargo xtask fuzz-datapath`: the datapath fuzzer (`tests/common/fuzz.rs`) for long runs.
//! Frames from a structure-aware generator, valid and broken, through every program of the
//! datapath, every property checked (see the module). Runs `--frames` frames in chunks of
//! `--chunk` from `--seed` (random if not given, printed first); a failure prints the seed, the
//! frame number and the frame, and exits 1.
#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Fuzz the datapath through BPF_PROG_TEST_RUN (root needed)")]
struct Args {
    /// Frames to run in all.
    #[arg(long, default_value_t = 1_000_000)]
    frames: u64,
    /// Seed of the first chunk (each chunk's seed is the previous one's plus one). Default: random.
    #[arg(long)]
    seed: Option<u64>,
    /// Frames per chunk: each chunk loads the datapath afresh, with empty conntrack tables.
    #[arg(long, default_value_t = 1_000_000)]
    chunk: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    println!("seed {seed:#x}, {} frames in chunks of {}", args.frames, args.chunk);
    let started = Instant::now();
    let (mut done, mut changed, mut dropped) = (0u64, 0u64, 0u64);
    let mut chunk_seed = seed;
    while done < args.frames {
        let n = args.chunk.min(args.frames - done);
        let Some(mut h) = common::harness() else {
            eprintln!("the fuzzer needs root");
            return std::process::ExitCode::FAILURE;
        };
        let this = chunk_seed;
        let result = std::thread::spawn(move || {
            let ifindex = common::node_netns::enter("nsx", "nsy");
            common::fuzz::run(&mut h, ifindex, this, n)
        })
        .join();
        match result {
            #[expect(clippy::cast_precision_loss, reason = "a rate to print")]
            Ok(Ok(r)) => {
                done += r.frames;
                changed += r.changed;
                dropped += r.dropped;
                println!(
                    "seed {this:#x}: {} frames, {} changed, {} dropped; {done} in all, {:.0} frames/s",
                    r.frames,
                    r.changed,
                    r.dropped,
                    done as f64 / started.elapsed().as_secs_f64()
                );
            }
            Ok(Err(f)) => {
                eprintln!("FAILED: seed {this:#x}, frame {}: {}", f.frame_no, f.what);
                return std::process::ExitCode::FAILURE;
            }
            Err(_) => {
                eprintln!("FAILED: seed {this:#x}: the fuzzer panicked");
                return std::process::ExitCode::FAILURE;
            }
        }
        chunk_seed = chunk_seed.wrapping_add(1);
    }
    println!(
        "{done} frames, {changed} changed, {dropped} dropped, every property held, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    std::process::ExitCode::SUCCESS
}
