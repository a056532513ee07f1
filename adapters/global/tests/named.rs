//! A named global segment: another process opens it and reads the running
//! program's heap, and the name is gone once the program exits.
//!
//! One binary plays every role (chosen by `ROLE`): the program under
//! inspection (the test itself), the inspector, and a program that just
//! exits.

use matrix_alloc::Matrix;
use matrix_alloc_global::MatrixGlobal;
use std::process::Command;

#[global_allocator]
static GLOBAL: MatrixGlobal = MatrixGlobal::new().size(1 << 30).named();

const MARKER: usize = 123_456;

fn main() {
    match std::env::var("ROLE").as_deref() {
        Ok("inspect") => inspect(&std::env::var("ID").unwrap()),
        Ok("exit") => println!("{}", GLOBAL.id().unwrap()),
        _ => {
            inspected_while_running();
            name_removed_at_exit();
            println!("2 passed, 0 failed");
        }
    }
}

fn child(role: &str, id: Option<String>) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env("ROLE", role);
    if let Some(id) = id {
        cmd.env("ID", id);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{role}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Opens the segment of the program being inspected, prints its counters.
fn inspect(id: &str) {
    let m = Matrix::open(id.parse().unwrap()).unwrap();
    let s = m.stats();
    let report = m.check().unwrap();
    println!("{} {} {}", s.curr_bytes, s.total_blocks, report.used_blocks);
}

fn inspected_while_running() {
    let id = GLOBAL.id().unwrap();
    // Creating the named segment allocated nothing either.
    assert_eq!(GLOBAL.early_bytes(), 0);
    let path = format!("/dev/shm/matrix-alloc-{id}");
    assert!(std::path::Path::new(&path).exists(), "{path}");
    let marker = std::hint::black_box(vec![1u8; MARKER]);
    // Applies this thread's batched counter changes, for the inspector.
    let mine = GLOBAL.stats().unwrap();
    let out = child("inspect", Some(id.to_string()));
    let seen: Vec<u64> = out.split_whitespace().map(|w| w.parse().unwrap()).collect();
    assert!(seen[0] >= MARKER as u64, "inspector saw {out}");
    assert!(
        seen[1] >= mine.total_blocks,
        "inspector saw {out}, we had {mine:?}"
    );
    assert!(seen[2] > 0, "check() found the live blocks");
    drop(marker);
}

fn name_removed_at_exit() {
    let id = child("exit", None);
    let path = format!("/dev/shm/matrix-alloc-{}", id.trim());
    assert!(!std::path::Path::new(&path).exists(), "{path} left behind");
}
