//! `process_heap_bytes{state="in_use"|"free"}`: what the allocator holds, read at each scrape
//! (glibc's `mallinfo2`). RSS alone cannot tell a leak from memory the allocator keeps: a leak
//! grows `in_use`; fragmentation grows RSS and `free` while `in_use` stays flat.
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::gauge::ConstGauge,
};

#[derive(Debug)]
pub struct Heap;

/// (in use, free) bytes: chunks handed out (mmapped ones included), and free chunks the
/// arenas keep. `None` where the allocator cannot say.
pub fn usage() -> Option<(u64, u64)> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics (glibc 2.33+).
        let m = unsafe { libc::mallinfo2() };
        Some(((m.uordblks + m.hblkhd) as u64, m.fordblks as u64))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

impl Collector for Heap {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some((in_use, free)) = usage() else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "process_heap_bytes",
            "Heap bytes the allocator has handed out (in_use) and keeps free in its arenas (free)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (state, v) in [("in_use", in_use), ("free", free)] {
            let labels = [("state", state)];
            let metric = family.encode_family(&labels)?;
            ConstGauge::new(v as i64).encode(metric)?;
        }
        Ok(())
    }
}
