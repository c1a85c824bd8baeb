//! The CUDA engine's step profile: an event recorded on the compute stream after each op group
//! (a *lap*, as `rdrop_core::Stopwatch` on the CPU), the groups' times read as the elapsed
//! time between consecutive events once the micro-batch's host sync has passed them. Off, a
//! lap does nothing; on, it costs one `cuEventRecord` (the events are made once and reused).

use std::sync::Arc;

use cudarc::driver::{sys::CUevent_flags, CudaEvent, CudaStream};
use rdrop_core::Profile;

use crate::engine::cost::Cost;
use crate::error::{Result, VitError};

/// Events between the groups of the micro-batches since [`EventLaps::start`].
#[derive(Debug)]
pub(crate) struct EventLaps {
    on: bool,
    stream: Arc<CudaStream>,
    /// The pool; `events[0..=marks.len()]` are recorded this micro-batch.
    events: Vec<CudaEvent>,
    /// The group each lap ends, with its FLOPs and bytes.
    marks: Vec<(&'static str, Cost)>,
    profile: Profile,
}

fn drv(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> VitError {
    move |e| VitError::cuda(op, e)
}

impl EventLaps {
    pub fn new(stream: Arc<CudaStream>) -> Self {
        Self {
            on: false,
            stream,
            events: Vec::new(),
            marks: Vec::new(),
            profile: Profile::default(),
        }
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Turns recording on or off (dropping what was recorded).
    pub fn set_on(&mut self, on: bool) {
        self.on = on;
        self.marks.clear();
        self.profile = Profile::default();
    }

    fn record(&mut self, i: usize) -> Result<()> {
        if i == self.events.len() {
            let e = self
                .stream
                .context()
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv("creating a profiling event"))?;
            self.events.push(e);
        }
        self.events[i]
            .record(&self.stream)
            .map_err(drv("recording a profiling event"))
    }

    /// Starts a micro-batch's first lap at this point of the stream.
    pub fn start(&mut self) -> Result<()> {
        if !self.on {
            return Ok(());
        }
        self.marks.clear();
        self.record(0)
    }

    /// Ends the current lap with the work enqueued so far, charged to `group`.
    pub fn lap(&mut self, group: &'static str, cost: Cost) -> Result<()> {
        if !self.on {
            return Ok(());
        }
        self.marks.push((group, cost));
        self.record(self.marks.len())
    }

    /// Reads the laps since [`EventLaps::start`] (waits for the last event) into the profile.
    pub fn finish(&mut self) -> Result<()> {
        if !self.on || self.marks.is_empty() {
            return Ok(());
        }
        for (i, (g, (f, b))) in self.marks.iter().enumerate() {
            let ms = self.events[i]
                .elapsed_ms(&self.events[i + 1])
                .map_err(drv("reading a profiling event"))?;
            self.profile.add(g, ms as f64, *f, *b);
        }
        self.marks.clear();
        Ok(())
    }

    /// The groups since the last take.
    pub fn take(&mut self) -> Profile {
        std::mem::take(&mut self.profile)
    }
}
