//! Timing and memory figures shared by the benches (`stages`, `upscaler`, `annotators`,
//! `face_restore`): medians over repeats with min and max, process CPU time, peak RSS, and each
//! stage as the JSON object tools/bench_compare.sh reads.

use std::time::Instant;

pub fn status_kb(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn reset_peak_rss() {
    // "5" resets the peak resident set size (VmHWM) to the current RSS (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// User + system CPU seconds of this process so far, all threads (Linux; 100 Hz ticks).
pub fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0
}

/// The median (mean of the middle two for an even count).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub struct Stat {
    pub name: String,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    pub cpu_median_s: f64,
    pub repeats: usize,
    pub peak_rss_mb: f64,
}

/// Times one run of `f`: (wall, process CPU) seconds.
pub fn time_once(f: &mut impl FnMut()) -> (f64, f64) {
    let cpu = process_cpu_s();
    let start = Instant::now();
    f();
    (start.elapsed().as_secs_f64(), process_cpu_s() - cpu)
}

pub fn stat_of(name: &str, mut times: Vec<(f64, f64)>, peak_rss_mb: f64) -> Stat {
    let mut wall: Vec<f64> = times.iter().map(|t| t.0).collect();
    let mut cpu: Vec<f64> = times.drain(..).map(|t| t.1).collect();
    let stat = Stat {
        name: name.to_string(),
        median_s: median(&mut wall),
        min_s: wall[0],
        max_s: wall[wall.len() - 1],
        cpu_median_s: median(&mut cpu),
        repeats: wall.len(),
        peak_rss_mb,
    };
    eprintln!(
        "{:<28} median {:>8.3} s  min {:>8.3}  max {:>8.3}  cpu {:>8.3} s  peak RSS {:>7.0} MB",
        stat.name, stat.median_s, stat.min_s, stat.max_s, stat.cpu_median_s, stat.peak_rss_mb
    );
    stat
}

pub fn measure(name: &str, repeats: usize, mut f: impl FnMut()) -> Stat {
    reset_peak_rss();
    let times: Vec<(f64, f64)> = (0..repeats).map(|_| time_once(&mut f)).collect();
    stat_of(
        name,
        times,
        status_kb("VmHWM:").unwrap_or(0) as f64 / 1024.0,
    )
}

/// One stage as a JSON object (the schema tools/bench_compare.sh and the Python benches share).
pub fn stage_json(s: &Stat) -> String {
    format!(
        "{{\"stage\":\"{}\",\"median_s\":{:.4},\"min_s\":{:.4},\"max_s\":{:.4},\"cpu_median_s\":{},\"repeats\":{},\"peak_rss_mb\":{:.0}}}",
        s.name,
        s.median_s,
        s.min_s,
        s.max_s,
        if s.cpu_median_s.is_finite() {
            format!("{:.4}", s.cpu_median_s)
        } else {
            "null".into()
        },
        s.repeats,
        s.peak_rss_mb
    )
}

/// A bench's JSON report, printed and written to `json` when given: `fields` (the bench's own
/// `"key":value` pairs), the peak RSS of its stages and of the process, and its stages.
#[allow(dead_code)] // `stages` writes its own, with the load's figures.
pub fn report(fields: &str, stats: &[Stat], json: Option<String>) {
    let peak_rss_mb = stats
        .iter()
        .map(|s| s.peak_rss_mb)
        .fold(status_kb("VmHWM:").unwrap_or(0) as f64 / 1024.0, f64::max);
    let stages: Vec<String> = stats.iter().map(stage_json).collect();
    let out = format!(
        "{{\"implementation\":\"sdserve\",{fields},\"peak_rss_mb\":{peak_rss_mb:.0},\"stages\":[{}]}}",
        stages.join(",")
    );
    println!("{out}");
    if let Some(p) = json {
        std::fs::write(p, &out).expect("write json");
    }
}
