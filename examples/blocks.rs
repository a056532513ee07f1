//! The blocks front end between two processes, with backpressure.
//!
//! The producer (this process, an async task under `pollster::block_on`)
//! makes a named segment whose blocks front end allows 256 KiB of live
//! blocks, and starts a consumer process. It allocates 2,000 blocks of 1 to
//! 16 KiB, fills each with a pattern and sends its id (two numbers) down
//! the consumer's stdin. The consumer opens each id, verifies every byte
//! and frees the block, a little slower than the producer makes them: the
//! limit fills up and the producer's `allocate().await` waits until the
//! consumer frees, woken through the segment's futex. Both print their
//! figures, waits included.
//!
//! `cargo run --release --example blocks`

use matrix_alloc::blocks::{BlockId, Blocks, BlocksConfig};
use matrix_alloc::Matrix;
use std::alloc::Layout;
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BLOCKS: u64 = 2_000;

fn config() -> BlocksConfig {
    BlocksConfig {
        max_memory: 256 << 10,
        max_block_size: 16 << 10,
        ..BlocksConfig::default()
    }
}

fn len_of(i: u64) -> usize {
    1024 + (i * 7919 % (15 << 10)) as usize
}

fn fill_of(i: u64) -> u8 {
    (i % 251) as u8
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == "--consumer" {
        return consumer(args[2].parse()?);
    }
    let m = Matrix::create(16 << 20)?;
    let id = m.id();
    let blocks = Blocks::new(m, config())?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--consumer", &id.to_string()])
        .stdin(Stdio::piped())
        .spawn()?;
    let mut pipe = child.stdin.take().ok_or("no pipe to the consumer")?;

    let started = Instant::now();
    pollster::block_on(async {
        for i in 0..BLOCKS {
            let len = len_of(i);
            let block = blocks
                .allocate_timeout(Layout::from_size_align(len, 8)?, Duration::from_secs(30))
                .await?;
            block.write(0, &vec![fill_of(i); len])?;
            let [a, b] = block.id().to_raw();
            writeln!(pipe, "{i} {a} {b}")?;
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;
    drop(pipe);
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("consumer failed: {status}").into());
    }
    let s = blocks.stats();
    println!(
        "producer: {} blocks sent in {:.0?}; waited {} times for the consumer, {:.0?} in all",
        s.allocated,
        started.elapsed(),
        s.waits,
        s.time_waited
    );
    println!(
        "segment: {} bytes of blocks live after the consumer's frees",
        s.current_bytes
    );
    Ok(())
}

fn consumer(id: uuid::Uuid) -> Result<(), Box<dyn std::error::Error>> {
    let blocks = Blocks::new(Matrix::open(id)?, config())?;
    let mut verified = 0u64;
    for line in std::io::stdin().lock().lines() {
        let words: Vec<u64> = line?.split(' ').map(str::parse).collect::<Result<_, _>>()?;
        let [i, a, b] = words[..] else {
            return Err("a malformed line".into());
        };
        let block = blocks.open(BlockId::from_raw([a, b]))?;
        let bytes = block.read(0, block.len())?;
        if block.len() != len_of(i) || bytes.iter().any(|&x| x != fill_of(i)) {
            return Err(format!("block {i} is not what was sent").into());
        }
        verified += 1;
        // Slower than the producer, so that the limit fills up.
        std::thread::sleep(Duration::from_micros(200));
        blocks.deallocate(block)?;
    }
    let s = blocks.stats();
    println!(
        "consumer: {verified} blocks verified and {} freed, every byte as sent",
        s.freed
    );
    Ok(())
}
