//! The fragmentation map of a heap: in the terminal, one character per
//! stretch of the heap (what covers most of it), and as an SVG file, one
//! rectangle per block (split where it crosses a row), each with its kind,
//! offset and length as attributes, so that a test can add them up.

use crate::report::human;
use matrix_alloc::{Region, RegionKind};
use std::fmt::Write;

const COLUMNS: u64 = 64;
const ROWS: u64 = 16;

fn symbol(kind: RegionKind) -> char {
    match kind {
        RegionKind::Free => '.',
        RegionKind::Used => '#',
        RegionKind::Page => 'p',
        RegionKind::Cached => 'c',
        RegionKind::Orphaned => '!',
    }
}

pub fn name(kind: RegionKind) -> &'static str {
    match kind {
        RegionKind::Free => "free",
        RegionKind::Used => "used",
        RegionKind::Page => "pages",
        RegionKind::Cached => "cached",
        RegionKind::Orphaned => "orphaned",
    }
}

fn colour(kind: RegionKind) -> &'static str {
    match kind {
        RegionKind::Free => "#e8e8e8",
        RegionKind::Used => "#3465a4",
        RegionKind::Page => "#73d216",
        RegionKind::Cached => "#edd400",
        RegionKind::Orphaned => "#cc0000",
    }
}

const KINDS: [RegionKind; 5] = [
    RegionKind::Free,
    RegionKind::Used,
    RegionKind::Page,
    RegionKind::Cached,
    RegionKind::Orphaned,
];

/// Splits the heap (from the first region's offset, `capacity` bytes) into
/// `cells` equal stretches and calls `each(cell, kind, bytes)` for every
/// piece of a region inside a cell.
fn pieces(
    regions: &[Region],
    capacity: u64,
    cells: u64,
    mut each: impl FnMut(u64, RegionKind, u64, u64),
) {
    let start = regions.first().map_or(0, |r| r.offset);
    let cell = capacity.div_ceil(cells).max(1);
    for r in regions {
        let (mut at, end) = (r.offset - start, r.offset - start + r.len);
        while at < end {
            let c = at / cell;
            let upto = ((c + 1) * cell).min(end);
            each(c, r.kind, at, upto - at);
            at = upto;
        }
    }
}

/// The terminal map: `ROWS` lines of `COLUMNS` characters, then a legend.
pub fn text(regions: &[Region], capacity: u64) -> String {
    let cells = COLUMNS * ROWS;
    let mut cover = vec![[0u64; 5]; cells as usize];
    pieces(regions, capacity, cells, |c, kind, _, bytes| {
        if let Some(cell) = cover.get_mut(c as usize) {
            cell[KINDS.iter().position(|k| *k == kind).unwrap_or(0)] += bytes;
        }
    });
    let mut out = format!(
        "map of the heap, {} a character:\n",
        human(capacity.div_ceil(cells))
    );
    for row in cover.chunks(COLUMNS as usize) {
        out.push_str("  ");
        for cell in row {
            let most = (0..5).max_by_key(|&k| cell[k]).unwrap_or(0);
            out.push(if cell[most] == 0 {
                ' '
            } else {
                symbol(KINDS[most])
            });
        }
        out.push('\n');
    }
    let legend: Vec<String> = KINDS
        .iter()
        .map(|k| format!("{} {}", symbol(*k), name(*k)))
        .collect();
    let _ = writeln!(out, "  {}", legend.join("   "));
    out
}

/// The SVG map: `ROWS` rows of the heap, each `WIDTH` pixels for its bytes.
pub fn svg(regions: &[Region], capacity: u64) -> String {
    const WIDTH: f64 = 1024.0;
    const ROW_H: f64 = 24.0;
    let row_bytes = capacity.div_ceil(ROWS).max(1);
    let height = ROWS as f64 * ROW_H + 40.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         data-capacity=\"{capacity}\">\n<title>matrix-alloc heap map: {} in {ROWS} rows</title>\n",
        human(capacity)
    );
    let start = regions.first().map_or(0, |r| r.offset);
    pieces(regions, capacity, ROWS, |row, kind, at, bytes| {
        let x = (at - row * row_bytes) as f64 / row_bytes as f64 * WIDTH;
        let w = bytes as f64 / row_bytes as f64 * WIDTH;
        let _ = writeln!(
            out,
            "<rect x=\"{x:.2}\" y=\"{:.0}\" width=\"{w:.2}\" height=\"{:.0}\" fill=\"{}\" \
             data-kind=\"{}\" data-offset=\"{}\" data-len=\"{bytes}\"><title>{} {} at {}</title></rect>",
            row as f64 * ROW_H,
            ROW_H - 2.0,
            colour(kind),
            name(kind),
            start + at,
            name(kind),
            human(bytes),
            start + at
        );
    });
    let mut x = 0.0;
    for k in KINDS {
        let _ = writeln!(
            out,
            "<rect x=\"{x}\" y=\"{:.0}\" width=\"14\" height=\"14\" fill=\"{}\"/>\
             <text x=\"{}\" y=\"{:.0}\" font-family=\"sans-serif\" font-size=\"13\">{}</text>",
            ROWS as f64 * ROW_H + 12.0,
            colour(k),
            x + 18.0,
            ROWS as f64 * ROW_H + 24.0,
            name(k)
        );
        x += 110.0;
    }
    out.push_str("</svg>\n");
    out
}
