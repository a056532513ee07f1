//! What each command reports: gathered as JSON values, printed either as
//! they are (`--json`) or as text for people.

use crate::map;
use crate::{Outcome, Target};
use matrix_alloc::{
    named_segments, Attached, Error, Inspector, Matrix, PageInfo, Reclaimed, Region, RegionKind,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Bytes for people: B, KiB, MiB, GiB.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn age_seconds(path: &Path) -> Option<u64> {
    let meta = std::fs::metadata(path).ok()?;
    let born = meta.created().or_else(|_| meta.modified()).ok()?;
    SystemTime::now()
        .duration_since(born)
        .ok()
        .map(|d| d.as_secs())
}

fn age(secs: Option<u64>) -> String {
    match secs {
        None => "?".into(),
        Some(s) if s < 120 => format!("{s}s"),
        Some(s) if s < 7200 => format!("{}m", s / 60),
        Some(s) if s < 172_800 => format!("{}h", s / 3600),
        Some(s) => format!("{}d", s / 86_400),
    }
}

/// One `ls` row: the figures of a segment that opens, else the reason.
fn summary(path: &Path) -> Value {
    let age = age_seconds(path);
    match Inspector::open_file(path) {
        Ok(seen) => {
            let s = seen.stats();
            let procs = seen.processes();
            let live = procs.iter().filter(|p| p.alive).count();
            let health = match seen.check() {
                Ok(_) => "ok".to_string(),
                Err(e) => format!("damaged: {e}"),
            };
            json!({
                "id": seen.id().to_string(),
                "path": path.display().to_string(),
                "size": seen.segment_size(),
                "heap": seen.capacity(),
                "used": s.block_bytes,
                "free": s.free_bytes,
                "largest_free": s.largest_free,
                "live_processes": live,
                "dead_processes": procs.len() - live,
                "layout_version": seen.layout_version(),
                "age_seconds": age,
                "status": health,
            })
        }
        Err(e) => json!({
            "path": path.display().to_string(),
            "size": std::fs::metadata(path).map(|m| m.len()).ok(),
            "age_seconds": age,
            "status": format!("cannot open: {e}"),
        }),
    }
}

pub fn ls(paths: &[PathBuf], json_out: bool) -> Result<Outcome, String> {
    let mut all: Vec<PathBuf> = named_segments()
        .map_err(|e| format!("/dev/shm: {e}"))?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    all.extend(paths.iter().cloned());
    let rows: Vec<Value> = all.iter().map(|p| summary(p)).collect();
    if json_out {
        println!("{}", Value::Array(rows));
        return Ok(Outcome::Done);
    }
    println!(
        "{:<36}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>3}  {:>5}  status",
        "id / path", "size", "used", "free", "largest", "procs", "ver", "age"
    );
    for r in &rows {
        let name = r["id"]
            .as_str()
            .unwrap_or_else(|| r["path"].as_str().unwrap_or("?"));
        let bytes = |k: &str| r[k].as_u64().map_or("-".into(), human);
        let procs = match (r["live_processes"].as_u64(), r["dead_processes"].as_u64()) {
            (Some(l), Some(d)) => format!("{l} live {d} dead"),
            _ => "-".into(),
        };
        println!(
            "{name:<36}  {:>9}  {:>9}  {:>9}  {:>9}  {procs:>9}  {:>3}  {:>5}  {}",
            bytes("size"),
            bytes("used"),
            bytes("free"),
            bytes("largest_free"),
            r["layout_version"]
                .as_u64()
                .map_or("-".into(), |v| v.to_string()),
            age(r["age_seconds"].as_u64()),
            r["status"].as_str().unwrap_or("")
        );
        if r["id"].is_string() && !r["path"].as_str().unwrap_or("").starts_with("/dev/shm/") {
            println!("  {}", r["path"].as_str().unwrap_or(""));
        }
    }
    Ok(Outcome::Done)
}

/// Engine blocks by power-of-two size range, and small blocks by block
/// size: (label, kind) -> (count, bytes).
fn by_size(regions: &[Region], pages: &[PageInfo]) -> Value {
    let mut engine: BTreeMap<(u32, &str), (u64, u64)> = BTreeMap::new();
    // Pages are counted by their small blocks, below.
    for r in regions.iter().filter(|r| r.kind != RegionKind::Page) {
        let kind = map::name(r.kind);
        let e = engine
            .entry((64 - r.len.leading_zeros(), kind))
            .or_default();
        *e = (e.0 + 1, e.1 + r.len);
    }
    let mut small: BTreeMap<u32, (u64, u64, u64)> = BTreeMap::new();
    for p in pages {
        let e = small.entry(p.block_size).or_default();
        *e = (e.0 + 1, e.1 + p.allocated as u64, e.2 + p.capacity as u64);
    }
    json!({
        "engine_blocks": engine.iter().map(|(&(log, kind), &(n, bytes))| json!({
            "up_to": 1u64 << log.min(63), "kind": kind, "count": n, "bytes": bytes,
        })).collect::<Vec<_>>(),
        "small_blocks": small.iter().map(|(&size, &(pages, allocated, capacity))| json!({
            "block_size": size, "pages": pages, "allocated": allocated, "capacity": capacity,
        })).collect::<Vec<_>>(),
    })
}

/// Pages per attached process.
fn pages_per_process(procs: &[Attached], pages: &[PageInfo]) -> Value {
    let mut per: BTreeMap<Option<usize>, (u64, u64)> = BTreeMap::new();
    for p in pages {
        let e = per.entry(p.owner_slot).or_default();
        *e = (e.0 + 1, e.1 + p.allocated as u64);
    }
    Value::Array(
        per.iter()
            .map(|(slot, &(pages, blocks))| {
                let owner = slot.and_then(|s| procs.iter().find(|p| p.slot == s));
                json!({
                    "slot": slot,
                    "pid": owner.map(|p| p.pid),
                    "alive": owner.map(|p| p.alive),
                    "pages": pages,
                    "allocated_blocks": blocks,
                })
            })
            .collect(),
    )
}

fn report_json(r: &matrix_alloc::HeapReport) -> Value {
    json!({
        "capacity": r.capacity, "used_blocks": r.used_blocks, "used_bytes": r.used_bytes,
        "requested_bytes": r.requested_bytes, "free_blocks": r.free_blocks,
        "free_bytes": r.free_bytes, "largest_free": r.largest_free,
        "orphaned_blocks": r.orphaned_blocks, "orphaned_bytes": r.orphaned_bytes,
        "nodes_in_use": r.nodes_in_use, "node_capacity": r.node_capacity,
        "unlisted_free_blocks": r.unlisted_free_blocks, "unmerged_pairs": r.unmerged_pairs,
        "unindexed_lists": r.unindexed_lists, "pages": r.pages,
        "cached_blocks": r.cached_blocks, "cached_bytes": r.cached_bytes,
        "counters_agree": r.counters_agree,
    })
}

fn stats_json(s: &matrix_alloc::Stats) -> Value {
    json!({
        "curr_blocks": s.curr_blocks, "curr_bytes": s.curr_bytes, "max_blocks": s.max_blocks,
        "max_bytes": s.max_bytes, "total_blocks": s.total_blocks, "total_bytes": s.total_bytes,
        "block_bytes": s.block_bytes, "max_block_bytes": s.max_block_bytes,
        "page_bytes": s.page_bytes, "cached_bytes": s.cached_bytes,
        "free_bytes": s.free_bytes, "largest_free": s.largest_free, "capacity": s.capacity,
    })
}

fn or_damage<T, E: std::fmt::Display>(r: Result<T, E>, f: impl FnOnce(T) -> Value) -> Value {
    match r {
        Ok(v) => f(v),
        Err(e) => json!({ "damaged": e.to_string() }),
    }
}

pub fn inspect(seen: &Inspector, json_out: bool, svg: Option<&Path>) -> Result<Outcome, String> {
    // Each read once: a walk of the heap, and one of the pages.
    let (regions, pages, procs) = (seen.regions(), seen.pages(), seen.processes());
    if let (Some(path), Ok(regions)) = (svg, &regions) {
        std::fs::write(path, map::svg(regions, seen.capacity() as u64))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let v = json!({
        "id": seen.id().to_string(),
        "path": seen.path().display().to_string(),
        "size": seen.segment_size(),
        "layout_version": seen.layout_version(),
        "processes": procs.iter().map(|p| json!({
            "slot": p.slot, "pid": p.pid, "alive": p.alive,
        })).collect::<Vec<_>>(),
        "stats": stats_json(&seen.stats()),
        "check": or_damage(seen.check(), |r| report_json(&r)),
        "by_size": match (&regions, &pages) {
            (Ok(regions), Ok(pages)) => by_size(regions, pages),
            (Err(e), _) | (_, Err(e)) => json!({ "damaged": e.to_string() }),
        },
        "pages_per_process": or_damage(pages.as_ref(), |p| pages_per_process(&procs, p)),
        "directory": or_damage(seen.directory(), |d| Value::Array(d.iter().map(|e| json!({
            "name": e.name, "type": e.type_name, "size": e.size, "offset": e.offset.get(),
        })).collect())),
    });
    if json_out {
        println!("{v}");
        return Ok(Outcome::Done);
    }
    print_inspect(&v);
    match &regions {
        Ok(regions) => print!("{}", map::text(regions, seen.capacity() as u64)),
        Err(e) => println!("map: damaged: {e}"),
    }
    Ok(Outcome::Done)
}

fn print_inspect(v: &Value) {
    let b = |x: &Value| x.as_u64().map_or("-".into(), human);
    println!(
        "segment {}  ({})",
        v["id"].as_str().unwrap_or(""),
        v["path"].as_str().unwrap_or("")
    );
    println!(
        "size {}, layout version {}",
        b(&v["size"]),
        v["layout_version"]
    );
    for p in v["processes"].as_array().into_iter().flatten() {
        let state = if p["alive"] == true { "alive" } else { "dead" };
        println!("  process {} ({state}, slot {})", p["pid"], p["slot"]);
    }
    let s = &v["stats"];
    println!(
        "in use: {} blocks, {} requested, {} of blocks ({} in pages, {} cached); free {}, largest free {}; peak {} requested",
        s["curr_blocks"], b(&s["curr_bytes"]), b(&s["block_bytes"]), b(&s["page_bytes"]),
        b(&s["cached_bytes"]), b(&s["free_bytes"]), b(&s["largest_free"]), b(&s["max_bytes"])
    );
    let c = &v["check"];
    if let Some(d) = c["damaged"].as_str() {
        println!("check: DAMAGED: {d}");
    } else {
        println!(
            "check: ok. {} used blocks ({}), {} free ({}), {} orphaned ({}), {} pages, nodes {} of {}, counters agree: {}",
            c["used_blocks"], b(&c["used_bytes"]), c["free_blocks"], b(&c["free_bytes"]),
            c["orphaned_blocks"], b(&c["orphaned_bytes"]), c["pages"], c["nodes_in_use"],
            c["node_capacity"], c["counters_agree"]
        );
    }
    println!("engine blocks by size:");
    for e in v["by_size"]["engine_blocks"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "  up to {:>9}  {:<8} {:>7} blocks  {:>10}",
            b(&e["up_to"]),
            e["kind"].as_str().unwrap_or(""),
            e["count"],
            b(&e["bytes"])
        );
    }
    println!("small blocks by size:");
    for e in v["by_size"]["small_blocks"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "  {:>5} B  {:>4} pages  {:>6} of {:>6} blocks allocated",
            e["block_size"], e["pages"], e["allocated"], e["capacity"]
        );
    }
    println!("pages per process:");
    for e in v["pages_per_process"].as_array().into_iter().flatten() {
        let who = match e["pid"].as_u64() {
            Some(pid) => format!("pid {pid}"),
            None => "abandoned".into(),
        };
        println!(
            "  {who:<14} {:>4} pages, {:>6} blocks",
            e["pages"], e["allocated_blocks"]
        );
    }
    let dir = v["directory"].as_array().map_or(&[][..], |d| d.as_slice());
    println!(
        "named objects:{}",
        if dir.is_empty() { " none" } else { "" }
    );
    for e in dir {
        println!(
            "  {:<24} {:>9}  {}",
            e["name"].as_str().unwrap_or(""),
            b(&e["size"]),
            e["type"].as_str().unwrap_or("")
        );
    }
}

pub fn check(seen: &Inspector, json_out: bool) -> Result<Outcome, String> {
    let result = seen.check();
    if json_out {
        let v = match &result {
            Ok(r) => report_json(r),
            Err(e) => json!({ "damaged": e.to_string() }),
        };
        println!("{v}");
    } else {
        match &result {
            Ok(r) => println!(
                "ok: {} used blocks, {} free blocks, {} orphaned blocks; counters agree: {}",
                r.used_blocks, r.free_blocks, r.orphaned_blocks, r.counters_agree
            ),
            Err(e) => println!("damaged: {e}"),
        }
    }
    Ok(if result.is_ok() {
        Outcome::Done
    } else {
        Outcome::Damaged
    })
}

pub fn reclaimed(r: &Reclaimed, json_out: bool) {
    if json_out {
        println!(
            "{}",
            json!({
                "engine_bytes": r.engine_bytes, "pages": r.pages, "cached_bytes": r.cached_bytes,
            })
        );
    } else {
        println!(
            "reclaimed: {} of engine blocks, {} pages, {} of cached blocks",
            human(r.engine_bytes),
            r.pages,
            human(r.cached_bytes)
        );
    }
}

/// Removes one segment file after making sure it is one of ours.
fn remove(target: &Target) -> Result<(), String> {
    let path = target.path();
    match target.inspect() {
        // Ours, or ours but unusable: removing it is what people want.
        Ok(_)
        | Err(Error::VersionMismatch { .. } | Error::Corrupt(_) | Error::CreatorDied { .. }) => {}
        Err(e) => return Err(format!("{}: {e}; not removed", path.display())),
    }
    match target {
        Target::Named(id) => Matrix::remove(*id).map_err(|e| format!("{}: {e}", path.display())),
        Target::File(p) => std::fs::remove_file(p).map_err(|e| format!("{}: {e}", p.display())),
    }
}

pub fn rm(targets: &[Target], json_out: bool) -> Result<Outcome, String> {
    let mut removed = Vec::new();
    for t in targets {
        remove(t)?;
        removed.push(t.path().display().to_string());
        if !json_out {
            println!("removed {}", t.path().display());
        }
    }
    if json_out {
        println!("{}", json!({ "removed": removed }));
    }
    Ok(Outcome::Done)
}

/// Named segments no live process is attached to (and ones whose creator
/// died while making them); the others, with why they stay.
pub fn rm_stale(dry_run: bool, json_out: bool) -> Result<Outcome, String> {
    let (mut stale, mut kept) = (Vec::new(), Vec::new());
    for (id, path) in named_segments().map_err(|e| format!("/dev/shm: {e}"))? {
        let why_kept = match Inspector::open(id) {
            Ok(seen) => {
                let live: Vec<u32> = seen
                    .processes()
                    .iter()
                    .filter(|p| p.alive)
                    .map(|p| p.pid)
                    .collect();
                (!live.is_empty()).then(|| format!("attached: {live:?}"))
            }
            Err(Error::CreatorDied { .. }) => None,
            Err(e) => Some(format!("cannot tell: {e}")),
        };
        match why_kept {
            None => stale.push((id, path)),
            Some(why) => kept.push((path, why)),
        }
    }
    let mut removed = Vec::new();
    for (id, path) in &stale {
        if !dry_run {
            Matrix::remove(*id).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        removed.push(path.display().to_string());
    }
    if json_out {
        println!(
            "{}",
            json!({
                "dry_run": dry_run,
                "stale": removed,
                "kept": kept.iter().map(|(p, why)| json!({"path": p.display().to_string(), "why": why})).collect::<Vec<_>>(),
            })
        );
    } else {
        let verb = if dry_run { "would remove" } else { "removed" };
        for p in &removed {
            println!("{verb} {p}");
        }
        for (p, why) in &kept {
            println!("kept {} ({why})", p.display());
        }
    }
    Ok(Outcome::Done)
}

pub fn watch(seen: &Inspector, every: Duration, count: Option<u64>, json_out: bool) {
    let mut n = 0;
    while count.is_none_or(|c| n < c) {
        if n > 0 {
            std::thread::sleep(every);
        }
        let s = seen.stats();
        let live = seen.processes().iter().filter(|p| p.alive).count();
        if json_out {
            let mut v = stats_json(&s);
            v["live_processes"] = live.into();
            println!("{v}");
        } else {
            if n % 20 == 0 {
                println!(
                    "{:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>5}",
                    "blocks", "requested", "in blocks", "free", "largest", "cached", "procs"
                );
            }
            println!(
                "{:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>5}",
                s.curr_blocks,
                human(s.curr_bytes),
                human(s.block_bytes),
                human(s.free_bytes),
                human(s.largest_free),
                human(s.cached_bytes),
                live
            );
        }
        n += 1;
    }
}
