//! Context lifecycles that span contexts, streams and memory: retaining and releasing a
//! device's primary context (at zero it is torn down: its streams closed and drained, its
//! memory freed, as the driver does) and destroying a context made by
//! [`crate::context::create`]. The contexts' state is [`crate::context`]'s, the streams'
//! [`crate::stream`]'s.

use std::sync::Mutex;

use crate::error::EmuError;
use crate::{context, memory, stream};

/// Held by a primary context's release (its teardown included) and by retains.
static TEARDOWN: Mutex<()> = Mutex::new(());

/// Retains device `d`'s primary context (activating it) and returns its id.
pub fn primary_retain(d: usize) -> Result<u64, EmuError> {
    // A retain waits for a release's teardown in progress, so that work still queued from the
    // old activation never runs in the new one.
    let _teardown = TEARDOWN.lock().unwrap_or_else(|p| p.into_inner());
    context::retain_primary(d)
}

/// Releases device `d`'s primary context; at zero it is destroyed with its memory, streams
/// and modules.
pub fn primary_release(d: usize) -> Result<(), EmuError> {
    let _teardown = TEARDOWN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(id) = context::release_primary(d)? {
        stream::destroy_context_streams(id);
        memory::free_all(d);
        memory::context_count(d, -1);
    }
    Ok(())
}

/// Destroys a context made by [`context::create`]: closes its streams (waiting for the work
/// in flight) and drops it from the calling thread's current contexts.
pub fn destroy(id: u64) -> Result<(), EmuError> {
    let d = context::deactivate_created(id)?;
    stream::destroy_context_streams(id);
    memory::context_count(d, -1);
    context::forget_current(id);
    Ok(())
}
