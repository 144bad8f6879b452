//! The threads that run the decode step's products: the calling thread and helpers that
//! stay awake between products.
//!
//! A decode step of a 1.1B Llama is about 110 short parallel products (q/k/v, attention,
//! o, gate/up and down per layer, then the lm head) with a little serial work between
//! them (norms, rotary embedding, residuals). On rayon's pool each product wakes sleeping
//! workers and puts the calling thread to sleep until they finish: measured on a 2-vCPU
//! VM, about 450 context switches per token, and each wake-up is an inter-processor
//! interrupt the hypervisor has to deliver. llama.cpp's threads instead poll for the next
//! operation. [`Team`] does the same for our decode kernels: one helper thread fewer than
//! rayon's pool has polls for work (with `spin_loop`) for [`POLL`] after each product,
//! then sleeps on a condition variable; the caller takes tasks alongside the helpers.
//!
//! Tasks are taken in any order by any thread, so callers give each task its own output
//! (as with rayon); the results do not depend on who ran what. One caller at a time owns
//! the team; a second concurrent caller (another request, a test thread) runs its tasks
//! on rayon's pool instead, as does everyone with `VIPLLAVA_DECODE_TEAM=0` (a switch for
//! before/after measurements).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long a helper polls for the next product before it sleeps: longer than the serial
/// work between two products of a decode step (tens of microseconds) and than the
/// sampling between two steps, short enough that a finished decode leaves no thread
/// spinning for long.
const POLL: Duration = Duration::from_millis(2);

/// Polls of the clock: one per this many `spin_loop` rounds.
const ROUNDS_PER_CLOCK_READ: u32 = 256;

/// Runs `task(i)` for every `i < count`, each exactly once, on the calling thread and the
/// decode team's helpers (or rayon's pool when the team is busy or switched off), and
/// returns when all have run. A panic in a task is raised again here.
pub(crate) fn for_each(count: usize, task: impl Fn(usize) + Sync) {
    if count == 0 {
        return;
    }
    if count == 1 {
        return task(0);
    }
    if !Team::get().is_some_and(|team| team.try_run(count, &task)) {
        (0..count).into_par_iter().for_each(&task);
    }
}

/// [`for_each`] over the `chunk`-long pieces of `data` (the last may be shorter):
/// `task(i, piece)` gets piece `i`.
pub(crate) fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    task: impl Fn(usize, &mut [T]) + Sync,
) {
    let len = data.len();
    let chunk = chunk.max(1);
    let base = SharedPtr(data.as_mut_ptr());
    for_each(len.div_ceil(chunk), |i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: `start < end <= len`, so the piece lies inside `data`, which is borrowed
        // mutably for the whole call; `for_each` runs each `i` once, so no two pieces given
        // out overlap.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        task(i, piece);
    });
}

/// `f(i)` for every `i < count`, in index order, computed as [`for_each`] does.
pub(crate) fn map<R: Send>(count: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let mut slots: Vec<Option<R>> = (0..count).map(|_| None).collect();
    for_each_chunk_mut(&mut slots, 1, |i, slot| slot[0] = Some(f(i)));
    // Every slot is filled: `for_each` ran every task or raised a task's panic.
    slots.into_iter().flatten().collect()
}

/// A raw pointer the tasks of one call share; each task touches its own elements only.
struct SharedPtr<T>(*mut T);

impl<T> SharedPtr<T> {
    /// A method, so closures capture the whole `SharedPtr` (which is `Sync`), not the field.
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: the pointer is only turned into disjoint slices of a `&mut [T]` whose owner
// waits for every task, and `T: Send` lets those pieces be written from other threads.
unsafe impl<T: Send> Sync for SharedPtr<T> {}

/// One call's tasks.
struct Job<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    count: usize,
    /// The next task index to hand out.
    next: AtomicUsize,
    /// Tasks not finished yet.
    left: AtomicUsize,
    panicked: AtomicBool,
}

impl Job<'_> {
    /// Takes and runs tasks until none is left to take.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.count {
                return;
            }
            if catch_unwind(AssertUnwindSafe(|| (self.task)(i))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            // Release: the task's writes are visible to the caller that sees `left == 0`.
            self.left.fetch_sub(1, Ordering::Release);
        }
    }
}

/// The helpers' shared state. A caller publishes a job (`job`, then `open`, then a new
/// `generation`); a helper that sees the new generation counts itself `active` and works
/// on the job only if it is still `open`. The caller closes the job once every task has
/// run and waits until no helper is `active`, so no helper touches the job after the
/// call returns (all orderings are sequentially consistent, so a helper that counts
/// itself after the caller's last look at `active` sees the job closed).
struct Team {
    /// Held by the caller whose job is published.
    owner: Mutex<()>,
    job: AtomicPtr<()>,
    open: AtomicBool,
    generation: AtomicUsize,
    active: AtomicUsize,
    /// Helpers asleep (or about to sleep) on `bell`.
    sleepers: AtomicUsize,
    bell: Mutex<()>,
    wake: Condvar,
}

impl Team {
    /// The process's team, started on first use; `None` when it has no helper (one
    /// thread) or is switched off.
    fn get() -> Option<&'static Team> {
        static TEAM: OnceLock<Option<&'static Team>> = OnceLock::new();
        *TEAM.get_or_init(|| {
            if std::env::var("VIPLLAVA_DECODE_TEAM").is_ok_and(|v| v == "0") {
                return None;
            }
            let wanted = rayon::current_num_threads().saturating_sub(1);
            let team: &'static Team = Box::leak(Box::new(Team {
                owner: Mutex::new(()),
                job: AtomicPtr::new(std::ptr::null_mut()),
                open: AtomicBool::new(false),
                generation: AtomicUsize::new(0),
                active: AtomicUsize::new(0),
                sleepers: AtomicUsize::new(0),
                bell: Mutex::new(()),
                wake: Condvar::new(),
            }));
            let started = (0..wanted)
                .take_while(|i| {
                    std::thread::Builder::new()
                        .name(format!("vipllava-decode-{i}"))
                        .spawn(move || team.help())
                        .is_ok()
                })
                .count();
            // Helpers that could not start leave the rest to poll; none at all: rayon.
            (started > 0).then_some(team)
        })
    }

    /// Runs the job on this thread and the helpers; false, with nothing run, when another
    /// caller owns the team.
    fn try_run(&self, count: usize, task: &(dyn Fn(usize) + Sync)) -> bool {
        let _owner = match self.owner.try_lock() {
            Ok(guard) => guard,
            // A panic raised again by an earlier call; the state is reset on every call.
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        let job = Job {
            task,
            count,
            next: AtomicUsize::new(0),
            left: AtomicUsize::new(count),
            panicked: AtomicBool::new(false),
        };
        self.job
            .store(&job as *const Job<'_> as *mut (), Ordering::SeqCst);
        self.open.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _bell = self.bell.lock().unwrap_or_else(|p| p.into_inner());
            self.wake.notify_all();
        }
        job.work();
        wait_until(|| job.left.load(Ordering::Acquire) == 0);
        self.open.store(false, Ordering::SeqCst);
        wait_until(|| self.active.load(Ordering::SeqCst) == 0);
        if job.panicked.load(Ordering::Relaxed) {
            panic!("a decode task panicked (its message is above)");
        }
        true
    }

    /// A helper's life: wait for a new job, work on it while it is open.
    fn help(&self) {
        let mut seen = self.generation.load(Ordering::SeqCst);
        loop {
            seen = self.next_generation(seen);
            self.active.fetch_add(1, Ordering::SeqCst);
            if self.open.load(Ordering::SeqCst) {
                let job = self.job.load(Ordering::SeqCst) as *const Job<'_>;
                // SAFETY: the job is open and this helper is counted active, so its caller
                // is still inside `run`, where the job lives (see the type's docs).
                unsafe { &*job }.work();
            }
            self.active.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Polls for a generation other than `seen` for [`POLL`], then sleeps until one comes.
    fn next_generation(&self, seen: usize) -> usize {
        let since = Instant::now();
        let mut rounds = 0u32;
        loop {
            let now = self.generation.load(Ordering::SeqCst);
            if now != seen {
                return now;
            }
            std::hint::spin_loop();
            rounds = rounds.wrapping_add(1);
            if rounds.is_multiple_of(ROUNDS_PER_CLOCK_READ) && since.elapsed() > POLL {
                break;
            }
        }
        let mut bell = self.bell.lock().unwrap_or_else(|p| p.into_inner());
        // Counted before the check: a caller that publishes after the check sees the
        // sleeper and rings (under `bell`, so not before this thread waits).
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        loop {
            let now = self.generation.load(Ordering::SeqCst);
            if now != seen {
                self.sleepers.fetch_sub(1, Ordering::SeqCst);
                return now;
            }
            bell = self.wake.wait(bell).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Spins until `done()`, yielding the CPU after a while (a helper that was descheduled
/// mid-task needs it back).
fn wait_until(done: impl Fn() -> bool) {
    let mut rounds = 0u32;
    while !done() {
        if rounds < 1 << 12 {
            std::hint::spin_loop();
            rounds += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_once_from_any_number_of_callers() {
        // Several threads at once: one owns the team, the others go to rayon.
        std::thread::scope(|s| {
            for caller in 0..4u64 {
                s.spawn(move || {
                    for round in 0..50u64 {
                        let count = 1 + ((caller * 31 + round * 7) % 97) as usize;
                        let runs: Vec<AtomicU64> = (0..count).map(|_| AtomicU64::new(0)).collect();
                        for_each(count, |i| {
                            runs[i].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(
                            runs.iter().all(|r| r.load(Ordering::Relaxed) == 1),
                            "count {count}"
                        );
                    }
                });
            }
        });
    }

    #[test]
    fn chunks_cover_the_slice_and_map_keeps_the_order() {
        for (len, chunk) in [(0, 4), (1, 4), (10, 3), (64, 16), (65, 16)] {
            let mut data = vec![0usize; len];
            for_each_chunk_mut(&mut data, chunk, |i, piece| {
                assert!(piece.len() <= chunk && !piece.is_empty());
                for (j, v) in piece.iter_mut().enumerate() {
                    *v = i * chunk + j + 1;
                }
            });
            assert_eq!(data, (1..=len).collect::<Vec<_>>());
        }
        assert_eq!(map(100, |i| i * i), (0..100).map(|i| i * i).collect::<Vec<_>>());
    }

    #[test]
    fn a_task_panic_reaches_the_caller_and_the_team_keeps_working() {
        let result = std::panic::catch_unwind(|| {
            for_each(8, |i| {
                if i == 5 {
                    panic!("task five");
                }
            })
        });
        assert!(result.is_err());
        assert_eq!(map(8, |i| i + 1), (1..=8).collect::<Vec<_>>());
    }
}
