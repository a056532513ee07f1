//! The counters as a dhat heap profile, so that dh_view (dhat's viewer)
//! shows the matrix's numbers next to a profile dhat wrote.
//!
//! The format is dhat's JSON (`dhatFileVersion` 2, `mode` "rust-heap"), as
//! the `dhat` crate writes it. The matrix keeps no backtraces, so the whole
//! heap is one program point under `[root]`; block lifetimes are not
//! tracked (`tl` is 0), and the time of the peak is not known (`tg` is the
//! end time).

use crate::{Error, Matrix, Stats};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

impl Stats {
    /// These counters as a dhat heap profile (JSON text). `elapsed` is the
    /// profile's duration; `label` names the one program point.
    pub fn to_dhat_json(&self, elapsed: Duration, label: &str) -> String {
        let cmd = std::env::args().collect::<Vec<_>>().join(" ");
        let te = elapsed.as_micros();
        let mut out = String::new();
        // `write!` to a `String` cannot fail.
        let _ = write!(
            out,
            "{{\"dhatFileVersion\":2,\"mode\":\"rust-heap\",\"verb\":\"Allocated\",\
             \"bklt\":true,\"bkacc\":false,\"tu\":\"µs\",\"Mtu\":\"s\",\"tuth\":10,\
             \"cmd\":{cmd},\"pid\":{pid},\"tg\":{te},\"te\":{te},\
             \"pps\":[{{\"tb\":{tb},\"tbk\":{tbk},\"tl\":0,\"mb\":{mb},\"mbk\":{mbk},\
             \"gb\":{mb},\"gbk\":{mbk},\"eb\":{eb},\"ebk\":{ebk},\"fs\":[1]}}],\
             \"ftbl\":[\"[root]\",{label}]}}",
            cmd = json_string(&cmd),
            pid = std::process::id(),
            tb = self.total_bytes,
            tbk = self.total_blocks,
            mb = self.max_bytes,
            mbk = self.max_blocks,
            eb = self.curr_bytes,
            ebk = self.curr_blocks,
            label = json_string(label),
        );
        out
    }
}

impl Matrix {
    /// Writes the segment's counters ([`Matrix::stats`]) to `path` as a dhat
    /// heap profile (see [`Stats::to_dhat_json`]), timed from when this
    /// handle was made. Returns the counters written.
    pub fn write_dhat_profile(&self, path: impl AsRef<Path>) -> Result<Stats, Error> {
        let stats = self.stats();
        let label = format!("matrix-alloc segment {}: all allocations", self.id());
        std::fs::write(path, stats.to_dhat_json(self.age(), &label))?;
        Ok(stats)
    }
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::json_string;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\nd"), "\"a\\\"b\\\\c\\u000ad\"");
        assert_eq!(json_string("µs"), "\"µs\"");
    }
}
