//! [`LocalCollective`]: ranks as threads of one process, for tests of the distributed update.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::collective::Collective;
use super::error::DistError;

/// One rank of a group of threads (see [`LocalCollective::group`]). Sums in rank order, like
/// the TCP [`super::Group`]. Dropping a rank makes the others' pending and later calls fail with
/// [`DistError::PeerDied`] instead of waiting forever (a thread that errors out or panics).
#[derive(Debug)]
pub struct LocalCollective {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
}

#[derive(Debug, Clone, PartialEq)]
enum Payload {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Barrier,
}

impl Payload {
    fn describe(&self) -> String {
        match self {
            Payload::F32(v) => format!("all_reduce_sum of {} f32", v.len()),
            Payload::F64(v) => format!("all_reduce_f64 of {} f64", v.len()),
            Payload::Barrier => "barrier".into(),
        }
    }

    /// `self += other`, or `None` when the calls differ.
    fn add(&mut self, other: &Payload) -> Option<()> {
        match (self, other) {
            (Payload::F32(a), Payload::F32(b)) if a.len() == b.len() => {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
            }
            (Payload::F64(a), Payload::F64(b)) if a.len() == b.len() => {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
            }
            (Payload::Barrier, Payload::Barrier) => {}
            _ => return None,
        }
        Some(())
    }
}

#[derive(Debug, Default)]
struct State {
    /// Completed collective calls.
    generation: u64,
    /// This call's contributions, by rank.
    slots: Vec<Option<Payload>>,
    /// The last completed call's result (or why it failed).
    result: Option<Result<Payload, String>>,
    /// A rank that was dropped.
    gone: Option<usize>,
}

impl LocalCollective {
    /// `n` connected ranks (`0..n`), to be moved to one thread each.
    pub fn group(n: usize) -> Vec<LocalCollective> {
        let shared = Arc::new(Shared {
            world: n,
            state: Mutex::new(State {
                slots: vec![None; n],
                ..State::default()
            }),
            cv: Condvar::new(),
        });
        (0..n)
            .map(|rank| LocalCollective {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than the panic itself; keep going so the others see `gone`.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn died(&self, rank: usize) -> DistError {
        DistError::PeerDied {
            rank,
            how: "its LocalCollective was dropped".into(),
        }
    }

    /// Contributes `mine`, waits for every rank, returns the rank-order sum.
    fn reduce(&self, mine: Payload) -> Result<Payload, DistError> {
        let mut st = self.lock();
        if let Some(g) = st.gone {
            return Err(self.died(g));
        }
        let generation = st.generation;
        st.slots[self.rank] = Some(mine);
        if st.slots.iter().all(Option::is_some) {
            let slots: Vec<Payload> = st.slots.iter_mut().filter_map(Option::take).collect();
            let mut sum = slots[0].clone();
            let mut result = Ok(());
            for (r, p) in slots.iter().enumerate().skip(1) {
                if sum.add(p).is_none() {
                    result = Err(format!(
                        "rank 0 called {} but rank {r} called {}",
                        slots[0].describe(),
                        p.describe()
                    ));
                    break;
                }
            }
            st.result = Some(result.map(|()| sum));
            st.generation += 1;
            self.shared.cv.notify_all();
        } else {
            while st.generation == generation && st.gone.is_none() {
                st = self
                    .shared
                    .cv
                    .wait(st)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            if st.generation == generation {
                let g = st.gone.unwrap_or(self.rank);
                return Err(self.died(g));
            }
        }
        match &st.result {
            Some(Ok(p)) => Ok(p.clone()),
            Some(Err(msg)) => Err(DistError::Protocol {
                rank: self.rank,
                msg: msg.clone(),
            }),
            None => Err(DistError::Protocol {
                rank: self.rank,
                msg: "no result".into(),
            }),
        }
    }
}

impl Drop for LocalCollective {
    fn drop(&mut self) {
        let mut st = self.lock();
        st.gone.get_or_insert(self.rank);
        self.shared.cv.notify_all();
    }
}

impl Collective for LocalCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        if let Payload::F32(v) = self.reduce(Payload::F32(buf.to_vec()))? {
            buf.copy_from_slice(&v);
        }
        Ok(())
    }

    fn all_reduce_f64(&self, v: &mut [f64]) -> Result<(), DistError> {
        if let Payload::F64(s) = self.reduce(Payload::F64(v.to_vec()))? {
            v.copy_from_slice(&s);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.reduce(Payload::Barrier).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(rank: usize, n: usize) -> Vec<f64> {
        // Magnitudes far apart, so that the summation order shows in the bits.
        (0..n)
            .map(|i| (1e16f64).powi(rank as i32 % 2) * (i as f64 + 0.1) / (rank as f64 + 3.0))
            .collect()
    }

    #[test]
    fn sums_in_rank_order_on_every_rank() {
        let world = 3;
        let group = LocalCollective::group(world);
        let out: Vec<(Vec<f64>, Vec<f32>)> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut v = values(c.rank(), 5);
                        let mut f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                        c.all_reduce_f64(&mut v).unwrap();
                        c.barrier().unwrap();
                        c.all_reduce_sum(&mut f).unwrap();
                        (v, f)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut want = values(0, 5);
        let mut want32: Vec<f32> = want.iter().map(|&x| x as f32).collect();
        for r in 1..world {
            for (i, x) in values(r, 5).into_iter().enumerate() {
                want[i] += x;
                want32[i] += x as f32;
            }
        }
        for (v, f) in &out {
            assert_eq!(v, &want);
            assert_eq!(f, &want32);
        }
    }

    #[test]
    fn different_calls_and_dropped_ranks_are_errors() {
        let mut group = LocalCollective::group(2);
        let b = group.pop().unwrap();
        let a = group.pop().unwrap();
        let (ra, rb) = std::thread::scope(|s| {
            let ha = s.spawn(|| a.all_reduce_f64(&mut [1.0, 2.0]));
            let hb = s.spawn(|| b.all_reduce_f64(&mut [1.0]));
            (ha.join().unwrap(), hb.join().unwrap())
        });
        for r in [ra, rb] {
            assert!(matches!(r, Err(DistError::Protocol { .. })), "{r:?}");
        }
        // Rank 1 goes away while rank 0 waits: rank 0 is told, not left hanging.
        let h = std::thread::spawn(move || a.barrier());
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(b);
        let r = h.join().unwrap();
        assert!(
            matches!(r, Err(DistError::PeerDied { rank: 1, .. })),
            "{r:?}"
        );
    }
}
