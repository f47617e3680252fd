//! Progress on stderr: indicatif bars and spinners on a terminal, plain log lines otherwise.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The CPU time (user and system, all threads) this process has used so far, in seconds; `None`
/// where `/proc` does not tell.
pub(crate) fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    cpu_seconds_of(&stat)
}

/// Reads utime and stime (fields 14 and 15, in ticks of 1/100 s) from a `/proc/PID/stat` line.
fn cpu_seconds_of(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces and parentheses: count from its closing one.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture's /proc interface.
    Some((utime + stime) as f64 / 100.0)
}

/// Shows what each upload is doing.
#[derive(Clone)]
pub(crate) struct Reporter {
    multi: Option<MultiProgress>,
}

impl Reporter {
    /// Bars on a terminal, lines otherwise.
    pub(crate) fn new() -> Self {
        let multi = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Reporter { multi }
    }

    /// One line on stderr, above any bars.
    pub(crate) fn line(&self, prefix: &str, msg: &str) {
        let text = format!("{prefix}: {msg}");
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    /// A waiting phase: a spinner, or a line when it starts and one when it ends.
    pub(crate) fn phase(&self, prefix: &str, msg: &str) -> Phase {
        let bar = self.multi.as_ref().map(|m| {
            let b = m.add(ProgressBar::new_spinner());
            b.set_style(
                ProgressStyle::with_template("{spinner} {prefix}: {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.set_prefix(prefix.to_string());
            b.set_message(msg.to_string());
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        if bar.is_none() {
            eprintln!("{prefix}: {msg} ...");
        }
        Phase {
            bar,
            prefix: prefix.to_string(),
            msg: msg.to_string(),
            start: Instant::now(),
        }
    }

    /// A byte counter shown as a bar with rate and ETA until the returned guard is dropped.
    pub(crate) fn bytes(
        &self,
        prefix: &str,
        msg: &str,
        total: u64,
        count: Arc<AtomicU64>,
    ) -> BytesGuard {
        let bar = self.multi.as_ref().map(|m| {
            let b = m.add(ProgressBar::new(total));
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix}: {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(prefix.to_string());
            b.set_message(msg.to_string());
            b
        });
        let prefix = prefix.to_string();
        let msg = msg.to_string();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let bar2 = bar.clone();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut last_line = Instant::now();
            loop {
                let done = tokio::time::timeout(Duration::from_millis(200), &mut stopped)
                    .await
                    .is_ok();
                let n = count.load(Ordering::Relaxed);
                match &bar2 {
                    Some(b) => b.set_position(n),
                    None if done || last_line.elapsed() >= Duration::from_secs(10) => {
                        last_line = Instant::now();
                        let secs = start.elapsed().as_secs_f64().max(0.001);
                        eprintln!(
                            "{prefix}: {msg}: {} of {} MiB, {:.1} MiB/s",
                            n >> 20,
                            total >> 20,
                            n as f64 / secs / 1048576.0
                        );
                    }
                    None => {}
                }
                if done {
                    break;
                }
            }
        });
        BytesGuard {
            bar,
            counter: Some((stop, task)),
        }
    }
}

impl Default for Reporter {
    fn default() -> Self {
        Self::new()
    }
}

/// A phase in progress; call `done` when it succeeds (dropping it clears the spinner).
pub(crate) struct Phase {
    bar: Option<ProgressBar>,
    prefix: String,
    msg: String,
    start: Instant,
}

impl Phase {
    pub(crate) fn set_message(&self, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_message(format!("{}: {msg}", self.msg));
        } else {
            eprintln!("{}: {}: {msg}", self.prefix, self.msg);
        }
    }

    pub(crate) fn done(self) {
        let took = self.start.elapsed();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        let line = format!(
            "{}: {} done in {:.1} s",
            self.prefix,
            self.msg,
            took.as_secs_f64()
        );
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        if let Some(b) = &self.bar
            && !b.is_finished()
        {
            b.finish_and_clear();
        }
    }
}

/// Stops the byte counter when dropped or finished.
pub(crate) struct BytesGuard {
    bar: Option<ProgressBar>,
    /// The counting task and what stops it; `None` once finished.
    counter: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl BytesGuard {
    pub(crate) async fn finish(mut self) {
        if let Some((stop, task)) = self.counter.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Drop for BytesGuard {
    fn drop(&mut self) {
        if let Some((_, task)) = &self.counter {
            task.abort();
        }
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_from_proc() {
        let line = "4242 (a (b) c) R 1 2 3 4 5 6 7 8 9 10 250 130 0 0 20 0 3 0";
        assert_eq!(cpu_seconds_of(line), Some(3.8));
        assert_eq!(cpu_seconds_of("4242 (x) R 1 2"), None);
        assert_eq!(cpu_seconds_of("garbage"), None);
        // The counter moves on while this thread spins (however busy the machine is).
        let before = cpu_seconds().unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_seconds().unwrap() - before < 0.05 {
            assert!(t.elapsed() < Duration::from_secs(30), "no CPU time counted");
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
    }
}
