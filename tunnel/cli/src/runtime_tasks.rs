//! `runtime_tasks_alive`: the async tasks alive in this process, read from the runtime at each
//! scrape. Every connection, stream and session is a task, so once they have ended the count
//! returns to the process's baseline; a count that only grows is a leak (the soak checks it).
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::gauge::ConstGauge,
};

#[derive(Debug)]
pub struct RuntimeTasks;

impl Collector for RuntimeTasks {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Scrapes are answered on the runtime; outside one there is nothing to count.
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return Ok(());
        };
        let gauge = ConstGauge::new(handle.metrics().num_alive_tasks() as i64);
        let metric = encoder.encode_descriptor(
            "runtime_tasks_alive",
            "Async tasks alive in this process (connections, streams, sessions and the daemon's own)",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}
