//! Images decoded on a background thread ahead of the steps that need them.
//!
//! With `prefetch = N > 0` a run loads only the samples' text up front
//! ([`crate::data::load_dataset_deferred`]); a [`Prefetcher`] thread reads, draws and
//! preprocesses the images in the order the schedule will use them and hands them over a
//! channel bounded to `N` images, so that at most `N` decoded images wait in memory and the
//! step finds its pixels ready while the previous step computes. With `prefetch = 0` every
//! image is decoded before the first step and kept (the samples' `pixel_values`).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use vipllava_processor::image::PixelValues;

use crate::data::{ImageJob, SampleEncoder};
use crate::error::SampleError;

/// One decoded image: the sample index and its pixels or why not.
pub type Decoded = (usize, Result<PixelValues, SampleError>);

/// A background thread decoding images in a given order through a bounded channel.
pub struct Prefetcher {
    rx: Receiver<Decoded>,
    _thread: JoinHandle<()>,
}

impl Prefetcher {
    /// Starts decoding `jobs[i]` for each `i` of `order`, at most `depth` (at least 1) ahead
    /// of the consumer. Dropping the prefetcher stops the thread after its current image.
    pub fn spawn(encoder: SampleEncoder, jobs: Arc<Vec<ImageJob>>, order: Vec<usize>, depth: usize) -> Self {
        let (tx, rx) = sync_channel::<Decoded>(depth.max(1));
        let thread = std::thread::spawn(move || {
            for i in order {
                let Some(job) = jobs.get(i) else {
                    break;
                };
                if tx.send((i, encoder.pixels(job))).is_err() {
                    break;
                }
            }
        });
        Self { rx, _thread: thread }
    }

    /// The next decoded image in order; `None` when the order is exhausted.
    pub fn next(&self) -> Option<Decoded> {
        self.rx.recv().ok()
    }
}
