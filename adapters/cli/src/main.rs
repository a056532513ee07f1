//! `matrix-alloc`: the segments of this crate seen from the shell, as
//! `ipcs`/`ipcrm` show System V memory. Which segments exist, who is
//! attached, how full and fragmented each is, whether it is healthy, and
//! cleaning up after a crash.
//!
//! Reading never writes: `ls`, `inspect`, `check` and `watch` go through
//! `matrix_alloc::Inspector` (a read-only mapping, no slot taken), so they
//! cannot change a segment and work on one that others are using. Only
//! `reclaim` and `rm` change anything.
//!
//! Exit status: 0 when all went well, 1 when `check` found damage, 2 on an
//! error (one line on standard error, like every error here).

mod map;
mod report;

use clap::{Parser, Subcommand};
use matrix_alloc::{named_segment_id, named_segment_path, Error, Inspector, Matrix};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "matrix-alloc",
    version,
    about = "List, inspect, check, reclaim and remove matrix-alloc segments"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every segment under /dev/shm, and the segment files given.
    Ls {
        /// Segment files to list too.
        paths: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Figures, census, blocks by size, pages per process, named objects
    /// and a fragmentation map of one segment.
    Inspect {
        /// A segment id (or /dev/shm file name), or a segment file.
        segment: String,
        #[arg(long)]
        json: bool,
        /// Also writes the fragmentation map as an SVG file.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
    /// Verifies every invariant of a segment; exit status 1 on damage.
    Check {
        segment: String,
        #[arg(long)]
        json: bool,
    },
    /// Takes back what dead processes held, and says what it took.
    Reclaim {
        segment: String,
        #[arg(long)]
        json: bool,
    },
    /// Removes segments: the ones named, or with --stale every named
    /// segment no live process is attached to.
    Rm {
        segments: Vec<String>,
        #[arg(long)]
        stale: bool,
        /// With --stale: says what would go, removes nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Live figures of a segment every interval, until interrupted.
    Watch {
        segment: String,
        /// Milliseconds between two lines.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Stops after this many lines (default: never).
        #[arg(long)]
        count: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

/// A segment named on the command line.
#[derive(Clone, Debug)]
enum Target {
    Named(Uuid),
    File(PathBuf),
}

impl Target {
    fn parse(s: &str) -> Target {
        // A path has a slash; an id (or the file name of a named segment)
        // has none.
        let id = Uuid::parse_str(s).ok().or_else(|| named_segment_id(s));
        match id {
            Some(id) if !s.contains('/') => Target::Named(id),
            _ => Target::File(PathBuf::from(s)),
        }
    }

    fn inspect(&self) -> Result<Inspector, Error> {
        match self {
            Target::Named(id) => Inspector::open(*id),
            Target::File(p) => Inspector::open_file(p),
        }
    }

    fn open(&self) -> Result<Matrix, Error> {
        match self {
            Target::Named(id) => Matrix::open(*id),
            Target::File(p) => Matrix::open_file(p),
        }
    }

    fn path(&self) -> PathBuf {
        match self {
            Target::Named(id) => named_segment_path(*id),
            Target::File(p) => p.clone(),
        }
    }
}

/// What a command ends with.
enum Outcome {
    Done,
    Damaged,
}

fn run(cli: Cli) -> Result<Outcome, String> {
    match cli.command {
        Command::Ls { paths, json } => report::ls(&paths, json),
        Command::Inspect { segment, json, svg } => {
            report::inspect(&inspect(&segment)?, json, svg.as_deref())
        }
        Command::Check { segment, json } => report::check(&inspect(&segment)?, json),
        Command::Reclaim { segment, json } => {
            let target = Target::parse(&segment);
            let m = target.open().map_err(|e| open_error(&target, e))?;
            report::reclaimed(&m.reclaim_dead(), json);
            Ok(Outcome::Done)
        }
        Command::Rm {
            segments,
            stale,
            dry_run,
            json,
        } => {
            if stale {
                if !segments.is_empty() {
                    return Err("rm --stale takes no segments".into());
                }
                report::rm_stale(dry_run, json)
            } else if segments.is_empty() {
                Err("rm: name the segments to remove, or give --stale".into())
            } else if dry_run {
                Err("rm: --dry-run goes with --stale".into())
            } else {
                let targets: Vec<Target> = segments.iter().map(|s| Target::parse(s)).collect();
                report::rm(&targets, json)
            }
        }
        Command::Watch {
            segment,
            interval_ms,
            count,
            json,
        } => {
            let seen = inspect(&segment)?;
            report::watch(&seen, Duration::from_millis(interval_ms), count, json);
            Ok(Outcome::Done)
        }
    }
}

/// The segment named on the command line, opened for reading.
fn inspect(segment: &str) -> Result<Inspector, String> {
    let target = Target::parse(segment);
    target.inspect().map_err(|e| open_error(&target, e))
}

/// The error, with the segment's path unless it names it already.
fn open_error(target: &Target, e: Error) -> String {
    let (path, message) = (target.path().display().to_string(), e.to_string());
    if message.contains(&path) {
        message
    } else {
        format!("{path}: {message}")
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // `--help` and `--version` print as clap prints them.
        Err(e) if !e.use_stderr() => e.exit(),
        // A usage error: its message on one line, as every error here
        // (clap's own runs on over the usage lines).
        Err(e) => {
            let text = e.to_string();
            let message: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
                .collect();
            let message = message.join(" ");
            eprintln!(
                "matrix-alloc: {}; see --help",
                message.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Damaged) => ExitCode::from(1),
        Err(e) => {
            eprintln!("matrix-alloc: {e}");
            ExitCode::from(2)
        }
    }
}
