//! The last hour of traffic for the status page's charts: a fixed ring of samples of the
//! running totals (bytes served from the cache, bytes fetched upstream, lookups, requests),
//! one every [`STEP`], turned into per-interval rates when the page is drawn.
//!
//! Memory is bounded by [`CAPACITY`] samples whatever the uptime. Time is passed in (time
//! since the process started), so the ring is tested without a clock; [`sample_every`] is
//! the task that feeds it from the live counters.

use std::collections::VecDeque;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

/// Time between two samples.
pub const STEP: Duration = Duration::from_secs(10);
/// How far back the charts reach.
pub const SPAN: Duration = Duration::from_secs(3600);
/// Samples kept: an hour of steps plus the one the oldest interval starts from.
pub const CAPACITY: usize = (SPAN.as_secs() / STEP.as_secs()) as usize + 1;
/// A live interval shorter than this is left out: its rates would be noise.
const MIN_LIVE: Duration = Duration::from_secs(1);

/// Running totals since start, as the metrics count them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Body bytes sent to clients from the cache (hits and stale answers).
    pub served_cache: u64,
    /// Body bytes received from upstreams.
    pub fetched: u64,
    /// Cache lookups answered from the cache (hits and stale answers).
    pub lookups_cached: u64,
    /// All cache lookups.
    pub lookups: u64,
    /// Requests answered.
    pub requests: u64,
}

/// Rates over one interval between two samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// Its start, as time before now.
    pub from: Duration,
    /// Its end, as time before now (zero for the interval ending now).
    pub to: Duration,
    /// Bytes per second sent from the cache.
    pub served_cache: f64,
    /// Bytes per second fetched from upstreams.
    pub fetched: f64,
    /// Share of lookups answered from the cache, when there were lookups.
    pub hit_ratio: Option<f64>,
    /// Requests per second.
    pub requests: f64,
}

/// The ring of samples: `(time since start, totals then)`, oldest first.
#[derive(Debug)]
pub struct History {
    samples: VecDeque<(Duration, Counters)>,
}

impl History {
    /// A history whose first sample is `start` at `at` (zero totals at process start).
    pub fn new(at: Duration, start: Counters) -> History {
        let mut samples = VecDeque::with_capacity(CAPACITY);
        samples.push_back((at, start));
        History { samples }
    }

    /// Adds the totals at `at`, dropping the oldest sample when full. A sample not later
    /// than the last one is ignored.
    pub fn record(&mut self, at: Duration, totals: Counters) {
        if self.samples.back().is_some_and(|(last, _)| at <= *last) {
            return;
        }
        if self.samples.len() == CAPACITY {
            self.samples.pop_front();
        }
        self.samples.push_back((at, totals));
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no sample is held (never: the first one stays until replaced).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Rates over each interval between samples that ends within [`SPAN`] of `now`, oldest
    /// first, plus the interval from the last sample to `live` (the totals at `now`) once it
    /// is at least a second long. An interval reaching back past the span is cut at its
    /// edge (its rates stay the same).
    pub fn intervals(&self, now: Duration, live: Counters) -> Vec<Interval> {
        let horizon = now.saturating_sub(SPAN);
        let mut points: Vec<(Duration, Counters)> = self
            .samples
            .iter()
            .copied()
            .filter(|(at, _)| *at <= now)
            .collect();
        if let Some((last, _)) = points.last() {
            if now.saturating_sub(*last) >= MIN_LIVE {
                points.push((now, live));
            }
        }
        points
            .windows(2)
            .filter(|w| w[1].0 > horizon)
            .map(|w| {
                let ((t0, a), (t1, b)) = (w[0], w[1]);
                let secs = (t1 - t0).as_secs_f64();
                let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
                let lookups = b.lookups.saturating_sub(a.lookups);
                Interval {
                    from: now - t0.max(horizon),
                    to: now - t1,
                    served_cache: rate(a.served_cache, b.served_cache),
                    fetched: rate(a.fetched, b.fetched),
                    hit_ratio: (lookups > 0).then(|| {
                        (b.lookups_cached.saturating_sub(a.lookups_cached) as f64 / lookups as f64)
                            .min(1.0)
                    }),
                    requests: rate(a.requests, b.requests),
                }
            })
            .collect()
    }
}

/// Records `read()` into `history` every [`STEP`] (time measured from `started`, on tokio's
/// clock) until the history is dropped. Holds no lock across an await: each tick locks only to push.
pub async fn sample_every(
    history: Weak<Mutex<History>>,
    started: Instant,
    read: impl Fn() -> Counters,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + STEP, STEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(history) = history.upgrade() else {
            return;
        };
        let totals = read();
        let at = started.elapsed();
        history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(at, totals);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn totals(served: u64, fetched: u64, cached: u64, lookups: u64, requests: u64) -> Counters {
        Counters {
            served_cache: served,
            fetched,
            lookups_cached: cached,
            lookups,
            requests,
        }
    }

    #[test]
    fn rates_per_interval_and_the_live_one() {
        let mut h = History::new(secs(0), Counters::default());
        h.record(secs(10), totals(1000, 500, 3, 4, 20));
        h.record(secs(20), totals(1000, 500, 3, 4, 20));
        let v = h.intervals(secs(25), totals(6000, 500, 5, 5, 30));
        assert_eq!(v.len(), 3);
        assert_eq!((v[0].from, v[0].to), (secs(25), secs(15)));
        assert_eq!(v[0].served_cache, 100.0);
        assert_eq!(v[0].fetched, 50.0);
        assert_eq!(v[0].hit_ratio, Some(0.75));
        assert_eq!(v[0].requests, 2.0);
        // Nothing happened: zero rates, no hit ratio.
        assert_eq!(v[1].served_cache, 0.0);
        assert_eq!(v[1].hit_ratio, None);
        // The live interval, 5 s long.
        assert_eq!((v[2].from, v[2].to), (secs(5), secs(0)));
        assert_eq!(v[2].served_cache, 1000.0);
        assert_eq!(v[2].hit_ratio, Some(1.0));
        assert_eq!(v[2].requests, 2.0);
    }

    #[test]
    fn a_live_interval_under_a_second_is_left_out() {
        let mut h = History::new(secs(0), Counters::default());
        h.record(secs(10), totals(10, 0, 0, 0, 1));
        let now = secs(10) + Duration::from_millis(300);
        let v = h.intervals(now, totals(1_000_000, 0, 0, 0, 500));
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].served_cache, 1.0);
        // A fresh process: nothing to draw yet.
        let fresh = History::new(secs(0), Counters::default());
        assert!(
            fresh
                .intervals(Duration::from_millis(500), totals(1, 1, 1, 1, 1))
                .is_empty()
        );
    }

    #[test]
    fn memory_is_bounded_and_the_chart_spans_one_hour() {
        let mut h = History::new(secs(0), Counters::default());
        let mut served = 0;
        // Ten hours of samples.
        for step in 1..=3600u64 {
            served += 10 * step;
            h.record(STEP * step as u32, totals(served, 0, 0, 0, step));
        }
        assert_eq!(h.len(), CAPACITY);
        let now = STEP * 3600;
        let v = h.intervals(now, totals(served, 0, 0, 0, 3600));
        assert_eq!(v.len(), CAPACITY - 1);
        assert_eq!(v[0].from, SPAN);
        assert_eq!(v.last().unwrap().to, Duration::ZERO);
        // The newest interval: 10 × 3600 bytes over 10 s.
        assert_eq!(v.last().unwrap().served_cache, 3600.0);
        assert!(v.iter().all(|i| i.requests == 0.1));
    }

    #[test]
    fn old_and_out_of_order_samples() {
        let mut h = History::new(secs(0), Counters::default());
        h.record(secs(10), totals(100, 0, 0, 0, 0));
        h.record(secs(10), totals(999, 0, 0, 0, 0));
        h.record(secs(5), totals(999, 0, 0, 0, 0));
        assert_eq!(h.len(), 2);
        // An interval reaching back past the hour is cut at its edge, its rate kept.
        let mut h = History::new(secs(0), Counters::default());
        h.record(secs(4000), totals(4000, 0, 0, 0, 0));
        let v = h.intervals(secs(4000), totals(4000, 0, 0, 0, 0));
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].from, v[0].to), (SPAN, Duration::ZERO));
        assert_eq!(v[0].served_cache, 1.0);
        // Counters that went backwards (never expected) count as zero, not as a wrap.
        let mut h = History::new(secs(0), totals(50, 50, 5, 5, 5));
        h.record(secs(10), totals(0, 0, 0, 0, 0));
        let v = h.intervals(secs(10), Counters::default());
        assert_eq!(v[0].served_cache, 0.0);
        assert_eq!(v[0].hit_ratio, None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sampler_records_every_step_and_stops_with_the_history() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let started = Instant::now();
        let history = Arc::new(Mutex::new(History::new(
            Duration::ZERO,
            Counters::default(),
        )));
        let requests = Arc::new(AtomicU64::new(0));
        let read = {
            let requests = requests.clone();
            move || Counters {
                requests: requests.load(Ordering::Relaxed),
                ..Counters::default()
            }
        };
        let task = tokio::spawn(sample_every(Arc::downgrade(&history), started, read));
        // Checked half-way between ticks: after 35 s, the ticks at 10, 20 and 30 s.
        tokio::time::sleep(STEP / 2).await;
        for _ in 0..3 {
            requests.fetch_add(10, Ordering::Relaxed);
            tokio::time::sleep(STEP).await;
        }
        {
            let h = history.lock().unwrap();
            assert_eq!(h.len(), 4);
            let v = h.intervals(STEP * 3, Counters::default());
            assert_eq!(
                v.iter().map(|i| i.requests).collect::<Vec<_>>(),
                [1.0, 1.0, 1.0]
            );
        }
        drop(history);
        tokio::time::sleep(STEP).await;
        tokio::time::timeout(STEP, task).await.unwrap().unwrap();
    }
}
