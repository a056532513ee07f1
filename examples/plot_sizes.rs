//! Draws the plot in BENCHMARKS.md from the output of the sizes bench:
//! time per replacement by size range, for each allocator, on one and on
//! two threads (a log scale, since the ranges differ by 100×).
//!
//! ```sh
//! cargo bench --bench sizes | tee target/sizes.txt
//! cargo run --release --example plot_sizes -- target/sizes.txt docs/sizes.svg
//! ```
//!
//! It reads the bench's lines `<range>, <n> thread(s): ...` and the
//! `ns per replacement: name ns, ...` line after each.

use std::fmt::Write;

struct Series {
    range: String,
    threads: u32,
    ns: Vec<(String, f64)>,
}

fn parse(text: &str) -> Vec<Series> {
    let mut out = Vec::new();
    let mut current: Option<(String, u32)> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some((head, _)) = line.split_once(" thread(s):") {
            if let Some((range, threads)) = head.rsplit_once(", ") {
                current = threads.parse().ok().map(|t| (range.to_string(), t));
            }
        } else if let Some(rest) = line.strip_prefix("ns per replacement:") {
            let Some((range, threads)) = current.take() else {
                continue;
            };
            let ns = rest
                .split(',')
                .filter_map(|kv| {
                    let (name, v) = kv.trim().rsplit_once(' ')?;
                    Some((name.to_string(), v.parse().ok()?))
                })
                .collect();
            out.push(Series { range, threads, ns });
        }
    }
    out
}

const COLOURS: [&str; 4] = ["#3465a4", "#729fcf", "#cc0000", "#888a85"];

fn svg(series: &[Series]) -> String {
    let names: Vec<String> = series
        .first()
        .map(|s| s.ns.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    let (w, h, left, top, bottom) = (980.0, 420.0, 70.0, 40.0, 90.0);
    let plot_h = h - top - bottom;
    let max = series
        .iter()
        .flat_map(|s| s.ns.iter().map(|(_, v)| *v))
        .fold(10.0f64, f64::max);
    let (lo, hi) = (10f64.log10(), max.log10().ceil());
    let y = |v: f64| top + plot_h * (1.0 - (v.max(10.0).log10() - lo) / (hi - lo));
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"22\" font-size=\"15\">ns per replacement (free one block, allocate one), by size range; log scale</text>\n"
    );
    let mut decade = 10.0;
    while decade <= 10f64.powf(hi) {
        let yy = y(decade);
        let _ = writeln!(
            out,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{decade}</text>",
            w - 10.0,
            left - 6.0,
            yy + 4.0
        );
        decade *= 10.0;
    }
    let group_w = (w - left - 10.0) / series.len().max(1) as f64;
    let bar_w = group_w * 0.8 / names.len().max(1) as f64;
    for (g, s) in series.iter().enumerate() {
        let x0 = left + g as f64 * group_w + group_w * 0.1;
        for (k, (name, v)) in s.ns.iter().enumerate() {
            let top_y = y(*v);
            let _ = writeln!(
                out,
                "<rect x=\"{:.1}\" y=\"{top_y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\">\
                 <title>{} {} thread(s), {name}: {v} ns</title></rect>",
                x0 + k as f64 * bar_w,
                bar_w - 1.0,
                top + plot_h - top_y,
                COLOURS[k % COLOURS.len()],
                s.range,
                s.threads
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{} thr</text>",
            x0 + group_w * 0.4,
            top + plot_h + 16.0,
            s.range,
            x0 + group_w * 0.4,
            top + plot_h + 30.0,
            s.threads
        );
    }
    for (k, name) in names.iter().enumerate() {
        let x = left + k as f64 * 160.0;
        let _ = writeln!(
            out,
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{name}</text>",
            h - 30.0,
            COLOURS[k % COLOURS.len()],
            x + 16.0,
            h - 20.0
        );
    }
    out.push_str("</svg>\n");
    out
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        eprintln!("usage: plot_sizes <sizes bench output> <out.svg>");
        std::process::exit(2);
    };
    let text = match std::fs::read_to_string(input) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("plot_sizes: {input}: {e}");
            std::process::exit(2);
        }
    };
    let series = parse(&text);
    if series.is_empty() {
        eprintln!("plot_sizes: {input}: no `ns per replacement` lines");
        std::process::exit(2);
    }
    if let Err(e) = std::fs::write(output, svg(&series)) {
        eprintln!("plot_sizes: {output}: {e}");
        std::process::exit(2);
    }
    println!("{output}: {} groups", series.len());
}
