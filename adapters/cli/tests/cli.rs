//! The real `matrix-alloc` binary against real segments: live and dead
//! attached processes (a child killed with SIGKILL), a damaged page
//! header, a foreign file, a version mismatch, `rm --stale` removing only
//! the stale ones, the SVG map adding up to the heap, and reading that
//! never writes.

use matrix_alloc::Matrix;
use serde_json::Value;
use std::alloc::Layout;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_matrix-alloc"))
        .args(args)
        .output()
        .unwrap()
}

fn json(args: &[&str]) -> Value {
    let out = cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("matrix-alloc-cli-{tag}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process (this test binary again) that opens the segment,
/// allocates small and large blocks, says "ready" and waits to be killed.
fn attached_child(segment: &str) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_attaches",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("CLI_TEST_SEGMENT", segment)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let ready = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.ends_with("ready"));
    assert!(ready, "the child did not attach");
    child
}

#[test]
fn child_attaches() {
    let Ok(segment) = std::env::var("CLI_TEST_SEGMENT") else {
        return; // Run as a test of its own: nothing to do.
    };
    let m = match uuid::Uuid::parse_str(&segment) {
        Ok(id) => Matrix::open(id).unwrap(),
        Err(_) => Matrix::open_file(&segment).unwrap(),
    };
    for size in [24, 24, 100, 3000, 70_000] {
        m.alloc(Layout::from_size_align(size, 8).unwrap()).unwrap();
    }
    println!("ready");
    std::thread::sleep(std::time::Duration::from_secs(120));
}

/// Kills (SIGKILL) and reaps a child.
fn kill(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

fn row<'a>(rows: &'a Value, id: &str) -> &'a Value {
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("{id} not listed: {rows}"))
}

#[test]
fn ls_shows_live_and_dead_processes() {
    let m = Matrix::create(4 << 20).unwrap();
    let id = m.id().to_string();
    let p = m.alloc(Layout::new::<[u8; 5000]>()).unwrap();
    kill(attached_child(&id));
    let rows = json(&["ls", "--json"]);
    let r = row(&rows, &id);
    assert_eq!(
        (r["live_processes"].as_u64(), r["dead_processes"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(r["status"], "ok");
    assert_eq!(r["size"], 4 << 20);
    assert!(r["used"].as_u64().unwrap() >= 5000, "{r}");
    assert!(r["largest_free"].as_u64().unwrap() <= r["free"].as_u64().unwrap());
    // The text listing names it too.
    assert!(text(&cli(&["ls"])).contains(&id));
    // `reclaim` takes back what the dead child held (its pages and its
    // blocks stay lost as blocks, but its pages come back).
    let reclaimed = json(&["reclaim", &id, "--json"]);
    assert!(reclaimed["pages"].as_u64().unwrap() >= 1, "{reclaimed}");
    // SAFETY: a block of this segment, freed once.
    unsafe { m.free(p).unwrap() };
}

#[test]
fn inspect_reports_everything_and_the_svg_adds_up() {
    let m = Matrix::create(4 << 20).unwrap();
    let id = m.id().to_string();
    let small: Vec<_> = (0..50)
        .map(|_| m.alloc(Layout::new::<[u8; 40]>()).unwrap())
        .collect();
    let big = m.alloc(Layout::new::<[u8; 100_000]>()).unwrap();
    let h = m.alloc_value(7u64).unwrap();
    m.publish("answer", h).unwrap();
    let dir = TempDir::new("svg");
    let svg_path = dir.0.join("map.svg");
    let v = json(&[
        "inspect",
        &id,
        "--json",
        "--svg",
        svg_path.to_str().unwrap(),
    ]);
    assert_eq!(v["processes"].as_array().unwrap().len(), 1);
    assert!(
        v["check"]["used_blocks"].as_u64().unwrap() >= 52,
        "{}",
        v["check"]
    );
    assert!(v["check"]["pages"].as_u64().unwrap() >= 1);
    let small_sizes = v["by_size"]["small_blocks"].as_array().unwrap();
    assert!(small_sizes
        .iter()
        .any(|e| e["block_size"] == 48 && e["allocated"].as_u64() >= Some(50)));
    let per_process = v["pages_per_process"].as_array().unwrap();
    assert_eq!(per_process[0]["pid"], std::process::id());
    let named = v["directory"].as_array().unwrap();
    assert!(
        named
            .iter()
            .any(|e| e["name"] == "answer" && e["size"] == 8),
        "{named:?}"
    );
    // The SVG's rectangles of the heap add up to the heap, by kind too.
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let capacity: u64 = attr(&svg, "data-capacity").next().unwrap().parse().unwrap();
    assert_eq!(capacity, v["check"]["capacity"]);
    let lens: u64 = attr(&svg, "data-len")
        .map(|l| l.parse::<u64>().unwrap())
        .sum();
    assert_eq!(lens, capacity);
    let free: u64 = svg
        .lines()
        .filter(|l| l.contains("data-kind=\"free\""))
        .flat_map(|l| {
            attr(l, "data-len")
                .map(|x| x.parse::<u64>().unwrap())
                .collect::<Vec<_>>()
        })
        .sum();
    assert_eq!(free, v["check"]["free_bytes"]);
    // The terminal map has its legend and every kind present.
    let shown = text(&cli(&["inspect", &id]));
    assert!(
        shown.contains("map of the heap") && shown.contains("# used") && shown.contains('p'),
        "{shown}"
    );
    // SAFETY: blocks of this segment, each freed once; the directory entry
    // is not used again.
    unsafe {
        m.free_value(h).unwrap();
        m.free(big).unwrap();
        for p in small {
            m.free(p).unwrap();
        }
    }
}

/// The values of attribute `name` in `xml`, in order.
fn attr<'a>(xml: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    let key = format!("{name}=\"");
    xml.match_indices(&key.clone())
        .map(move |(at, _)| {
            let rest = &xml[at + key.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect::<Vec<_>>()
        .into_iter()
}

/// A file segment with a few dozen small blocks, and where its first
/// page's header is.
fn file_segment(path: &Path) -> usize {
    let m = Matrix::create_file(path, 1 << 20).unwrap();
    let blocks: Vec<_> = (0..40)
        .map(|_| m.alloc(Layout::new::<[u8; 48]>()).unwrap())
        .collect();
    let first = m.offset_of(blocks[0].as_ptr()).unwrap().get() as usize;
    drop(m);
    let bytes = std::fs::read(path).unwrap();
    let page = first / (16 << 10) * (16 << 10);
    (page..page + 2048)
        .find(|&at| &bytes[at..at + 4] == b"MTXP")
        .unwrap()
}

#[test]
fn check_finds_a_damaged_page_header_and_reading_never_writes() {
    let dir = TempDir::new("check");
    let path = dir.0.join("segment");
    let header = file_segment(&path);
    let p = path.to_str().unwrap();
    let out = cli(&["check", p]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).starts_with("ok"));
    // Reading never writes: the file is byte for byte the same after every
    // reading command.
    let before = std::fs::read(&path).unwrap();
    for args in [
        vec!["ls", p],
        vec!["inspect", p],
        vec!["check", p],
        vec!["watch", p, "--count", "2", "--interval-ms", "10"],
    ] {
        assert!(cli(&args).status.success(), "{args:?}");
    }
    assert!(
        std::fs::read(&path).unwrap() == before,
        "a reading command changed the segment"
    );
    // One byte of the page header's capacity flipped.
    let mut damaged = before.clone();
    damaged[header + 12] ^= 0x40;
    std::fs::write(&path, &damaged).unwrap();
    let out = cli(&["check", p]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("damaged") && text(&out).contains("page"),
        "{}",
        text(&out)
    );
    let v: Value = serde_json::from_slice(&cli(&["check", p, "--json"]).stdout).unwrap();
    assert!(v["damaged"].is_string());
    // `inspect` still reports, and says what is damaged.
    let out = cli(&["inspect", p]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("DAMAGED"), "{}", text(&out));
}

#[test]
fn foreign_files_and_other_versions_are_named_not_opened() {
    let dir = TempDir::new("foreign");
    let foreign = dir.0.join("foreign");
    std::fs::write(&foreign, vec![0x5au8; 1 << 20]).unwrap();
    let f = foreign.to_str().unwrap();
    let out = cli(&["check", f]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("not a matrix-alloc segment"),
        "{}",
        text(&out)
    );
    assert_eq!(text(&out).lines().count(), 1, "one line: {}", text(&out));
    let out = cli(&["rm", f]);
    assert_eq!(out.status.code(), Some(2));
    assert!(foreign.exists(), "rm removed a foreign file");
    // A segment of another layout version: listed with the reason, removable.
    let other = dir.0.join("other-version");
    drop(Matrix::create_file(&other, 1 << 20).unwrap());
    let mut bytes = std::fs::read(&other).unwrap();
    bytes[16..20].copy_from_slice(&999u32.to_le_bytes());
    std::fs::write(&other, &bytes).unwrap();
    let o = other.to_str().unwrap();
    let rows = json(&["ls", o, f, "--json"]);
    let status = |p: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["path"] == p)
            .unwrap()["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(status(o).contains("version"), "{rows}");
    assert!(status(f).contains("not a matrix-alloc segment"), "{rows}");
    assert!(cli(&["rm", o]).status.success());
    assert!(!other.exists());
    // A segment that does not exist, and bad arguments: one line, status 2.
    let out = cli(&["inspect", "/nonexistent/segment"]);
    assert_eq!(out.status.code(), Some(2));
    for bad in [
        &["rm"][..],
        &["frobnicate"],
        &["check"],
        &["watch", "x", "--count", "many"],
    ] {
        let out = cli(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert_eq!(text(&out).lines().count(), 1, "{bad:?}: {}", text(&out));
    }
    assert!(cli(&["--help"]).status.success());
}

#[test]
fn rm_stale_removes_only_segments_no_live_process_holds() {
    // Stale: kept after its only process was killed.
    let stale = Matrix::create(1 << 20).unwrap();
    stale.keep();
    let stale_id = stale.id().to_string();
    drop(stale);
    kill(attached_child(&stale_id));
    // Live: this process holds it.
    let live = Matrix::create(1 << 20).unwrap();
    let live_id = live.id().to_string();
    let dry = json(&["rm", "--stale", "--dry-run", "--json"]);
    let listed = |v: &Value, key: &str, id: &str| {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.to_string().contains(id))
    };
    assert!(
        listed(&dry, "stale", &stale_id) && !listed(&dry, "stale", &live_id),
        "{dry}"
    );
    assert!(listed(&dry, "kept", &live_id));
    let stale_path = format!("/dev/shm/matrix-alloc-{stale_id}");
    assert!(Path::new(&stale_path).exists(), "--dry-run removed it");
    let done = json(&["rm", "--stale", "--json"]);
    assert!(listed(&done, "stale", &stale_id), "{done}");
    assert!(!Path::new(&stale_path).exists());
    assert!(live.path().unwrap().exists());
}

#[test]
fn watch_prints_a_line_per_interval() {
    let m = Matrix::create(1 << 20).unwrap();
    let id = m.id().to_string();
    let out = cli(&[
        "watch",
        &id,
        "--count",
        "3",
        "--interval-ms",
        "20",
        "--json",
    ]);
    assert!(out.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines
        .iter()
        .all(|l| l["live_processes"] == 1 && l["capacity"].as_u64() > Some(0)));
}
