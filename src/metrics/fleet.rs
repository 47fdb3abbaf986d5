//! The fleet's figures (`regcache_fleet_*`), read from its counters at each scrape.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Unit;

use super::live::{counter, gauge};
use crate::fleet::stats::{FleetStats, LeaseResult, Op};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The fleet's counters, read at each scrape.
#[derive(Debug)]
pub(super) struct FleetLive(pub(super) Arc<FleetStats>);

// One counter family with the given `(labels, value)` series.
fn counters<L: EncodeLabelSet + fmt::Debug>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let c = ConstCounter::new(0u64);
    let mut m = enc.encode_descriptor(name, help, unit, c.metric_type())?;
    for (labels, v) in series {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for FleetLive {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        counters(
            &mut enc,
            "fleet_store_requests",
            "Requests sent to the fleet's object store, by operation (multipart: each request of an upload)",
            None,
            Op::ALL.map(|op| (OpLabels { op: op.label() }, s.requests(op))),
        )?;
        let (read, written) = s.store_bytes();
        counters(
            &mut enc,
            "fleet_store",
            "Bytes read from and written to the fleet's object store",
            Some(&Unit::Bytes),
            [
                (DirectionLabels { direction: "read" }, read),
                (DirectionLabels { direction: "write" }, written),
            ],
        )?;
        let (served, received) = s.peer_bytes();
        counters(
            &mut enc,
            "fleet_peer",
            "Blob bytes sent to and received from other replicas",
            Some(&Unit::Bytes),
            [
                (
                    DirectionLabels {
                        direction: "served",
                    },
                    served,
                ),
                (
                    DirectionLabels {
                        direction: "received",
                    },
                    received,
                ),
            ],
        )?;
        counters(
            &mut enc,
            "fleet_leases",
            "Download leases by outcome (won: led, followed: streamed from another replica, taken_over: swapped a stale lease, renewal_refused: lost one)",
            None,
            LeaseResult::ALL.map(|r| (ResultLabels { result: r.label() }, s.leases(r))),
        )?;
        gauge(
            &mut enc,
            "fleet_store_up",
            "1 when the fleet's object store answered its last request, 0 when not (degraded mode)",
            None,
            i64::from(s.store_up()),
        )?;
        counter(
            &mut enc,
            "fleet_degraded_transitions",
            "Times this replica went into degraded mode (object store unreachable)",
            None,
            s.degraded_transitions(),
        )
    }
}
