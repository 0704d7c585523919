//! Dividing the machine's slots (`max_parallel_jobs`) among the hubs it
//! serves: stride scheduling.
//!
//! Each hub has a share (`[hubs.NAME] share`, default 1) and a *pass*. A
//! free slot is offered to the hub with the lowest pass among those that
//! can use it (connected, work waiting for this agent — the hub's
//! `Backlog` —, under their own `max_parallel_jobs`), and that hub's pass
//! grows by `STRIDE / share`. So while several hubs have work, the slots
//! they are given are in proportion to their shares: over any stretch of
//! N slot grants a hub's count is within one grant of `N × share / Σ
//! shares` — "over time" means over the grants, i.e. job starts (jobs of
//! similar length split the machine's time the same way). A hub that
//! alone has work gets every slot; a hub that is down or has no work is
//! offered none, so it never holds up the others.
//!
//! A hub that comes back after having had no work starts at the pass of
//! the busiest-served hub still active, not at its old low pass: it gets
//! its share from then on, not a burst making up for the time it was idle
//! (stride scheduling's usual rule for a client that rejoins).
//!
//! An offer the hub has not filled yet is withdrawn (and its charge given
//! back) when the hub cannot use it any more (its backlog shrank, it went
//! down), so the slot can go to another hub. Offers cross assignments in
//! flight: a job assigned after its offer was withdrawn still starts if
//! the machine has a free slot (and is charged), else it is handed back.
//!
//! Pure bookkeeping: the session (`session.rs`) tells it what each hub
//! runs and has waiting, and sends each hub its offer (`Slots`).

/// A whole pass step: a hub with share `s` advances `STRIDE / s` per slot.
/// Divisible by every share up to 16 (and 720720 / s rounds well above).
const STRIDE: u64 = 720_720;

/// What one hub can use now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Demand {
    /// Its jobs running here.
    pub running: u32,
    /// Queued jobs it has for this agent (its last `Backlog`).
    pub backlog: u32,
    /// Its own cap on jobs at once (`[hubs.NAME] max_parallel_jobs`).
    pub cap: u32,
    /// It may be offered slots: connected, not leaving.
    pub open: bool,
}

/// One hub's standing.
#[derive(Debug, Clone)]
struct Standing {
    share: u32,
    pass: u64,
    /// Slots offered and not filled yet.
    outstanding: u32,
    /// It had work or jobs at the last division.
    active: bool,
}

impl Standing {
    fn stride(&self) -> u64 {
        STRIDE / u64::from(self.share.max(1))
    }
}

/// The division of `total` slots among hubs, by index.
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    total: u32,
    hubs: Vec<Standing>,
}

impl Slots {
    /// `total` slots among hubs with these shares.
    pub fn new(total: u32, shares: &[u32]) -> Slots {
        Slots {
            total,
            hubs: shares
                .iter()
                .map(|&share| Standing {
                    share: share.max(1),
                    pass: 0,
                    outstanding: 0,
                    active: false,
                })
                .collect(),
        }
    }

    /// The slots hub `i` may fill now, its running jobs included: what its
    /// `Slots` says.
    pub fn offered(&self, i: usize, running: u32) -> u32 {
        running + self.hubs.get(i).map_or(0, |h| h.outstanding)
    }

    /// The slots offered to hub `i` and not filled yet.
    pub fn outstanding(&self, i: usize) -> u32 {
        self.hubs.get(i).map_or(0, |h| h.outstanding)
    }

    /// A job of hub `i` started: it filled an offer, or (assigned across a
    /// withdrawal) is charged now.
    pub fn started(&mut self, i: usize) {
        if let Some(h) = self.hubs.get_mut(i) {
            if h.outstanding > 0 {
                h.outstanding -= 1;
            } else {
                h.pass += h.stride();
            }
        }
    }

    /// Hub `i` is gone (unenrolled): later indices shift down.
    pub fn remove(&mut self, i: usize) {
        if i < self.hubs.len() {
            self.hubs.remove(i);
        }
    }

    /// Divides the free slots again given what each hub can use now
    /// (`demand[i]` for hub `i`): withdraws offers a hub cannot use, then
    /// offers each free slot to the hub with the lowest pass that can.
    pub fn divide(&mut self, demand: &[Demand]) {
        let n = self.hubs.len().min(demand.len());
        // What each hub could fill now.
        let want = |d: &Demand| {
            if d.open {
                d.backlog.min(d.cap.saturating_sub(d.running))
            } else {
                0
            }
        };
        for (h, d) in self.hubs.iter_mut().zip(demand).take(n) {
            let w = want(d);
            if h.outstanding > w {
                let back = u64::from(h.outstanding - w) * h.stride();
                h.pass = h.pass.saturating_sub(back);
                h.outstanding = w;
            }
        }
        // A hub that rejoins starts level with the least-served active one.
        let floor = self.hubs.iter().filter(|h| h.active).map(|h| h.pass).min();
        for (h, d) in self.hubs.iter_mut().zip(demand).take(n) {
            let active = d.open && (d.backlog > 0 || d.running > 0);
            if active && !h.active {
                if let Some(floor) = floor {
                    h.pass = h.pass.max(floor);
                }
            }
            h.active = active;
        }
        let mut used: u32 = self
            .hubs
            .iter()
            .zip(demand)
            .take(n)
            .map(|(h, d)| d.running + h.outstanding)
            .sum();
        // A job that started across a withdrawn offer can fill the machine
        // while another hub's offer still stands: withdraw offers (the
        // best-served hub's first) until running jobs and offers fit, or
        // that hub's assignments would only come back to it.
        while used > self.total {
            let pick = (0..n)
                .filter(|&i| self.hubs[i].outstanding > 0)
                .max_by_key(|&i| (self.hubs[i].pass, i));
            let Some(i) = pick else {
                break;
            };
            let h = &mut self.hubs[i];
            h.outstanding -= 1;
            h.pass = h.pass.saturating_sub(h.stride());
            used -= 1;
        }
        let mut free = self.total.saturating_sub(used);
        while free > 0 {
            let pick = (0..n)
                .filter(|&i| self.hubs[i].outstanding < want(&demand[i]))
                .min_by_key(|&i| (self.hubs[i].pass, i));
            let Some(i) = pick else {
                break;
            };
            let h = &mut self.hubs[i];
            h.outstanding += 1;
            h.pass += h.stride();
            free -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hub 0's job crossed the withdrawal of its offer and started: the
    /// machine is full, so hub 1's standing offer is withdrawn too (else
    /// each of its assignments would be handed straight back).
    #[test]
    fn offers_never_exceed_the_free_slots() {
        let mut slots = Slots::new(1, &[1, 1]);
        let d = |running, backlog| Demand {
            running,
            backlog,
            cap: 1,
            open: true,
        };
        slots.divide(&[d(0, 1), d(0, 0)]);
        assert_eq!((slots.outstanding(0), slots.outstanding(1)), (1, 0));
        slots.divide(&[d(0, 0), d(0, 1)]);
        assert_eq!((slots.outstanding(0), slots.outstanding(1)), (0, 1));
        slots.started(0);
        slots.divide(&[d(1, 0), d(0, 1)]);
        assert_eq!(slots.offered(1, 0), 0, "the machine is full");
        assert_eq!(slots.offered(0, 1), 1);
    }

    /// Runs `rounds` job starts on a machine of `total` slots where every
    /// hub in `busy` has endless work: each round, the divided offers are
    /// filled, then one running job (the oldest) finishes. Returns how
    /// many jobs each hub started.
    fn simulate(total: u32, shares: &[u32], busy: &[bool], rounds: usize) -> Vec<usize> {
        let mut slots = Slots::new(total, shares);
        let n = shares.len();
        let mut running: Vec<u32> = vec![0; n];
        let mut order: std::collections::VecDeque<usize> = Default::default();
        let mut started = vec![0; n];
        let demand = |running: &[u32]| -> Vec<Demand> {
            (0..n)
                .map(|i| Demand {
                    running: running[i],
                    backlog: if busy[i] { 1000 } else { 0 },
                    cap: total,
                    open: true,
                })
                .collect()
        };
        while started.iter().sum::<usize>() < rounds {
            slots.divide(&demand(&running));
            // Every hub fills what it is offered.
            for i in 0..n {
                while slots.offered(i, running[i]) > running[i] {
                    slots.started(i);
                    running[i] += 1;
                    started[i] += 1;
                    order.push_back(i);
                }
            }
            assert!(running.iter().sum::<u32>() <= total, "{running:?}");
            if let Some(i) = order.pop_front() {
                running[i] -= 1;
            } else {
                break;
            }
        }
        started
    }

    #[test]
    fn busy_hubs_get_slots_in_proportion_to_their_shares() {
        let got = simulate(3, &[2, 1], &[true, true], 300);
        assert!((199..=201).contains(&got[0]), "{got:?}");
        let got = simulate(4, &[1, 1, 2], &[true, true, true], 400);
        for (g, want) in got.iter().zip([100, 100, 200]) {
            assert!(g.abs_diff(want) <= 2, "{got:?}");
        }
        // Shares that do not divide the stride evenly still split fairly.
        let got = simulate(2, &[7, 3], &[true, true], 1000);
        assert!(got[0].abs_diff(700) <= 2, "{got:?}");
    }

    #[test]
    fn a_hub_alone_with_work_gets_every_slot() {
        let mut slots = Slots::new(3, &[2, 1]);
        let demand = [
            Demand {
                running: 0,
                backlog: 0,
                cap: 3,
                open: true,
            },
            Demand {
                running: 0,
                backlog: 50,
                cap: 3,
                open: true,
            },
        ];
        slots.divide(&demand);
        assert_eq!(slots.offered(0, 0), 0);
        assert_eq!(slots.offered(1, 0), 3);
        let got = simulate(3, &[2, 1], &[false, true], 100);
        assert_eq!(got, [0, 100]);
    }

    #[test]
    fn a_hub_that_goes_down_loses_its_unfilled_offers_to_the_other() {
        let mut slots = Slots::new(2, &[1, 1]);
        let mut demand = [Demand {
            running: 0,
            backlog: 10,
            cap: 2,
            open: true,
        }; 2];
        slots.divide(&demand);
        assert_eq!((slots.offered(0, 0), slots.offered(1, 0)), (1, 1));
        // Hub 0 goes down before filling its offer: hub 1 gets both.
        demand[0].open = false;
        slots.divide(&demand);
        assert_eq!((slots.offered(0, 0), slots.offered(1, 0)), (0, 2));
        // Its running jobs still count against the machine's slots.
        let mut slots = Slots::new(2, &[1, 1]);
        demand[0].running = 1;
        slots.divide(&demand);
        assert_eq!(slots.offered(1, 0), 1);
    }

    #[test]
    fn offers_respect_backlog_and_per_hub_caps() {
        let mut slots = Slots::new(4, &[1, 1]);
        let demand = [
            Demand {
                running: 0,
                backlog: 1,
                cap: 4,
                open: true,
            },
            Demand {
                running: 0,
                backlog: 10,
                cap: 2,
                open: true,
            },
        ];
        slots.divide(&demand);
        // One job waits at hub 0; hub 1 may run two at most: one slot idles.
        assert_eq!((slots.offered(0, 0), slots.offered(1, 0)), (1, 2));
    }

    #[test]
    fn a_hub_that_rejoins_gets_its_share_not_a_burst() {
        let mut slots = Slots::new(1, &[1, 1]);
        let mut running = [0u32, 0];
        let demand = |running: [u32; 2], busy0: bool| {
            [
                Demand {
                    running: running[0],
                    backlog: if busy0 { 100 } else { 0 },
                    cap: 1,
                    open: true,
                },
                Demand {
                    running: running[1],
                    backlog: 100,
                    cap: 1,
                    open: true,
                },
            ]
        };
        // Hub 1 alone for 50 jobs.
        for _ in 0..50 {
            slots.divide(&demand(running, false));
            assert_eq!(slots.offered(1, 0), 1);
            slots.started(1);
            running = [0, 0];
        }
        // Hub 0 comes back: the two alternate from now on.
        let mut got = [0, 0];
        for _ in 0..20 {
            slots.divide(&demand(running, true));
            let i = if slots.offered(0, 0) == 1 { 0 } else { 1 };
            assert_eq!(slots.offered(i, 0), 1);
            slots.started(i);
            got[i] += 1;
        }
        assert_eq!(got, [10, 10]);
    }

    #[test]
    fn a_job_assigned_across_a_withdrawal_is_charged() {
        let mut slots = Slots::new(1, &[1, 1]);
        slots.started(0);
        slots.started(0);
        let demand = [Demand {
            running: 0,
            backlog: 5,
            cap: 1,
            open: true,
        }; 2];
        slots.divide(&demand);
        // Hub 0 was charged twice: hub 1 gets the slot.
        assert_eq!((slots.offered(0, 0), slots.offered(1, 0)), (0, 1));
    }
}
