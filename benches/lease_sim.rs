//! Lease mode (`store.counting: lease`) simulated on a fake clock, checked
//! against the bounds the README states for it.
//!
//! R replicas share one calendar counter with limit L. Checks arrive at a
//! fixed aggregate rate, spread over the replicas at random, until more
//! units than L have been offered, so every run goes past exhaustion. The
//! variants: cost 1 or random 1..=10, uniform or skewed traffic (one replica
//! gets half), `store.lease.replicas` at its default or at R, one replica
//! crashing halfway (its leased units stay stranded), one replica going quiet
//! (its units go back after `idle`), and a limit of 10^9 that is never reached,
//! for the Redis calls per allowed Check far from the limit.
//!
//! No I/O, no real time, no Redis, no runtime: a seeded splitmix64 makes every
//! run the same. `Redis::take` and `Redis::give` mirror the `take` and `give`
//! ops of `src/store/redis/lease.lua`, and `Replica::spend` and `Replica::sweep`
//! the replica side in `src/store/lease/`: if the script or the store
//! changes, this model must change with it. Not modelled: the lease
//! lifetime (a renewal tops a lease up to one block at most, so it keeps
//! within the same bounds) and credits (the same take and give on a balance
//! instead of `limit − counter`).
//!
//! Asserted (a violation panics, so the binary exits non-zero): units allowed
//! ≤ L at every moment; at every refusal, the units left unspent
//! (L − units spent) ≤ R · (max_block + cost_max − 1); at the end, units
//! allowed ≥ L − R · (max_block + cost_max − 1); a crashed replica strands
//! ≤ max_block + cost_max − 1. Also the model's own invariant, counter =
//! spent + units the replicas hold, after every Redis call.
//!
//! Run with `cargo bench --bench lease_sim`; `-- --quick` (or
//! `LEASE_SIM_QUICK=1`) uses small sizes. The whole run takes seconds in release.

use tollgate::config::LeaseConfig;

/// The seed of every run: the output is the same on every machine.
const SEED: u64 = 0x1ea5_e51b;

/// splitmix64: tiny, seeded, good enough to spread Checks; no dependency.
struct Rng(u64);

impl Rng {
    /// The next 64 random bits.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift (no modulo bias worth the name).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// The Redis side of one calendar counter: the counter and the lease hash
/// lease.lua reads and writes, one entry per holder (0: no record).
struct Redis {
    /// The quota's limit, as each take passes it.
    limit: u64,
    /// Spent + leased units, all replicas.
    counter: u64,
    /// Holder → units leased and not given back (may overstate what it holds).
    records: Vec<u64>,
    /// Script calls (takes and give-backs): the Redis round trips.
    ops: u64,
}

impl Redis {
    /// lease.lua `take`: grants a block of `need..` units or nothing;
    /// returns `(grant, counter)`. `holds` is what the holder still holds.
    fn take(&mut self, holder: usize, need: u64, max_block: u64, divisor: u64, holds: u64) -> (u64, u64) {
        self.ops += 1;
        let held = self.records[holder];
        // The script answers "corrupt" here; the model must never get there.
        assert!(holds <= held, "model bug: holder {holder} holds {holds} > its record {held}");
        let free = self.limit.saturating_sub(self.counter);
        let mut grant = 0;
        if free >= need && free > 0 {
            // Same order of clamps as the script: large far from the limit, 1 near it.
            grant = (free / divisor).min(max_block).max(1).max(need).min(free);
        }
        if grant > 0 {
            self.counter += grant;
            self.records[holder] = holds + grant;
        } else {
            // HDEL when it holds nothing, else HSET to what it holds.
            self.records[holder] = holds;
        }
        (grant, self.counter)
    }

    /// lease.lua `give`: gives back at most what the record says (and the
    /// counter has), deletes the record; returns the units given back.
    fn give(&mut self, holder: usize, units: u64) -> u64 {
        self.ops += 1;
        let back = units.min(self.records[holder]).min(self.counter);
        self.records[holder] = 0;
        self.counter -= back;
        back
    }
}

/// What becomes of the one replica an event hits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Event {
    /// Killed (SIGKILL, OOM): no more Checks, never gives back.
    Crash,
    /// Gets no more Checks but lives: its sweep gives its units back after `idle`.
    Quiet,
}

/// A replica's state for the one counter (`Lease` and `AccountLeases` in `store::lease`).
#[derive(Default)]
struct Replica {
    /// Leased units not yet spent.
    units: u64,
    /// Whether it has a lease entry (after any take): a sweep then makes a give call.
    lease: bool,
    /// Until then, refuses locally what needs more than `units + free_seen`.
    exhausted_until: Option<u64>,
    /// The free units (limit − counter) its refused take saw.
    free_seen: u64,
    /// Its last spend, for the idle give-back.
    last_used: Option<u64>,
    /// Its sweeper's next tick (every `idle / 2`, from a random phase).
    next_sweep: u64,
    /// Crashed: no Checks, no sweeps.
    dead: bool,
}

/// The lease settings a run uses, in the units of the fake clock (µs).
#[derive(Clone, Copy)]
struct Knobs {
    /// `store.lease.max_block`.
    max_block: u64,
    /// `2 · store.lease.replicas`.
    divisor: u64,
    /// `store.lease.idle`, µs.
    idle: u64,
}

impl Replica {
    /// One leased spend (`LeaseStore::leased_spend` for one calendar quota):
    /// spends locally if it holds `cost`, else takes from Redis unless it
    /// knows the counter exhausted. Whether the Check is allowed.
    fn spend(&mut self, id: usize, cost: u64, now: u64, redis: &mut Redis, k: Knobs) -> bool {
        self.last_used = Some(now);
        let known_exhausted =
            self.units + self.free_seen < cost && self.exhausted_until.is_some_and(|until| now < until);
        if !known_exhausted && self.units < cost {
            let (grant, counter) = redis.take(id, cost - self.units, k.max_block, k.divisor, self.units);
            self.lease = true;
            if grant == 0 {
                self.exhausted_until = Some(now + k.idle);
                self.free_seen = redis.limit.saturating_sub(counter);
            } else {
                self.units += grant;
                self.exhausted_until = None;
            }
        }
        if self.units >= cost {
            self.units -= cost;
            true
        } else {
            false
        }
    }

    /// One sweeper tick at `now` (`LeaseStore::sweep_once`): idle for `idle`,
    /// it gives its lease back (one call, even with 0 units: it deletes the
    /// record) and forgets the counter, "exhausted" mark included.
    fn sweep(&mut self, id: usize, now: u64, redis: &mut Redis, k: Knobs) {
        if self.last_used.is_some_and(|t| now - t < k.idle) {
            return;
        }
        if self.lease {
            let back = redis.give(id, self.units);
            assert_eq!(back, self.units, "model bug: replica {id} gave back {back} of {}", self.units);
        }
        let next_sweep = self.next_sweep;
        *self = Replica { next_sweep, ..Replica::default() };
    }
}

/// One simulated run.
struct Variant {
    /// Its name in the output.
    name: &'static str,
    /// R.
    replicas: usize,
    /// `store.lease.replicas` (the default, or R).
    replicas_setting: u64,
    /// L.
    limit: u64,
    /// Offer Checks until this many units were offered...
    offered_units: u64,
    /// ...or this many Checks (what bounds the 10^9 runs).
    max_checks: u64,
    /// Costs are uniform in `1..=cost_max`.
    cost_max: u64,
    /// Replica 0 gets half the Checks, the others share the rest.
    skewed: bool,
    /// The last replica crashes or goes quiet once this many units were offered.
    event: Option<(Event, u64)>,
    /// `store.lease.idle`, µs.
    idle: u64,
    /// Checks per second, all replicas.
    rate: u64,
}

/// What a run counted.
struct Outcome {
    /// Checks offered.
    offered: u64,
    /// Checks allowed.
    allowed: u64,
    /// Checks refused.
    refused: u64,
    /// Units allowed (spent).
    spent: u64,
    /// Checks refused while L − spent was at least their cost: the under-use.
    refused_avail: u64,
    /// The most units left (L − spent) at such a refusal.
    max_avail: u64,
    /// Units the crashed replica held when it died.
    stranded: Option<u64>,
    /// Redis calls.
    ops: u64,
}

/// Checks `counter = spent + units held` (dead replicas included): what
/// makes every bound below follow, so a model that broke it proves nothing.
fn check_invariant(redis: &Redis, reps: &[Replica], spent: u64) {
    let held: u64 = reps.iter().map(|r| r.units).sum();
    assert_eq!(redis.counter, spent + held, "model bug: counter ≠ spent + held");
}

/// Runs `v` on the fake clock (one Check per `1/rate` s) and asserts the stated bounds.
fn run(v: &Variant, base: &LeaseConfig) -> Outcome {
    let mut rng = Rng(SEED ^ v.limit ^ (v.cost_max << 32));
    let k = Knobs { max_block: base.max_block, divisor: 2 * v.replicas_setting, idle: v.idle };
    let tick = (v.idle / 2).max(1);
    let mut redis = Redis { limit: v.limit, counter: 0, records: vec![0; v.replicas], ops: 0 };
    let mut reps: Vec<Replica> =
        (0..v.replicas).map(|_| Replica { next_sweep: rng.below(tick), ..Replica::default() }).collect();
    // Who gets Checks; replica 0 is the skewed one, the last one the event's.
    let mut senders: Vec<usize> = (0..v.replicas).collect();
    let mut event = v.event;
    let mut next_sweep = reps.iter().map(|r| r.next_sweep).min().unwrap_or(u64::MAX);
    let mut o = Outcome {
        offered: 0,
        allowed: 0,
        refused: 0,
        spent: 0,
        refused_avail: 0,
        max_avail: 0,
        stranded: None,
        ops: 0,
    };
    let mut offered_units = 0;
    for i in 0..v.max_checks {
        if offered_units >= v.offered_units {
            break;
        }
        let now = (u128::from(i) * 1_000_000 / u128::from(v.rate)) as u64;
        if let Some((what, at)) = event
            && offered_units >= at
        {
            let last = v.replicas - 1;
            senders.retain(|&r| r != last);
            if what == Event::Crash {
                reps[last].dead = true;
                o.stranded = Some(reps[last].units);
            }
            event = None;
        }
        if now >= next_sweep {
            for (id, rep) in reps.iter_mut().enumerate() {
                // Bounded: each pass moves the tick forward by `tick` ≥ 1 µs, up to `now`.
                while rep.next_sweep <= now {
                    if !rep.dead {
                        rep.sweep(id, rep.next_sweep, &mut redis, k);
                    }
                    rep.next_sweep += tick;
                }
            }
            next_sweep = reps.iter().map(|r| r.next_sweep).min().unwrap_or(u64::MAX);
            check_invariant(&redis, &reps, o.spent);
        }
        let cost = 1 + rng.below(v.cost_max);
        let id = if v.skewed && senders.contains(&0) && rng.below(2) == 0 {
            0
        } else {
            let others = if v.skewed { &senders[usize::from(senders.first() == Some(&0))..] } else { &senders[..] };
            others[rng.below(others.len() as u64) as usize]
        };
        o.offered += 1;
        offered_units += cost;
        let ops = redis.ops;
        if reps[id].spend(id, cost, now, &mut redis, k) {
            o.allowed += 1;
            o.spent += cost;
            assert!(o.spent <= v.limit, "{}: {} units allowed > limit {}", v.name, o.spent, v.limit);
        } else {
            o.refused += 1;
            let avail = v.limit - o.spent;
            if avail >= cost {
                o.refused_avail += 1;
                o.max_avail = o.max_avail.max(avail);
            }
        }
        if redis.ops != ops {
            check_invariant(&redis, &reps, o.spent);
        }
    }
    check_invariant(&redis, &reps, o.spent);
    o.ops = redis.ops;

    let per_replica = base.max_block + v.cost_max - 1;
    let under = v.replicas as u64 * per_replica;
    assert!(
        o.max_avail <= under,
        "{}: refused with {} units left > R·(max_block + cost − 1) = {under}",
        v.name,
        o.max_avail
    );
    if offered_units > v.limit {
        assert!(o.spent + under >= v.limit, "{}: {} units allowed < L − {under}", v.name, o.spent);
    }
    if let Some(stranded) = o.stranded {
        assert!(stranded <= per_replica, "{}: {stranded} units stranded > max_block + cost − 1", v.name);
        assert!(o.spent + stranded <= v.limit, "{}: stranded units were spent", v.name);
    }
    o
}

/// The variants: around `limit` (past exhaustion) and at 10^9 (far from it).
fn variants(quick: bool, base: &LeaseConfig) -> Vec<Variant> {
    let (limit, rate, far_checks) = if quick { (10_000, 10_000, 200_000) } else { (1_000_000, 1_000_000, 20_000_000) };
    let idle = base.idle.as_micros() as u64;
    let r = 10;
    let v = |name, cost_max, skewed, event: Option<(Event, f64)>| Variant {
        name,
        replicas: r,
        replicas_setting: base.replicas,
        limit,
        offered_units: limit * 6 / 5,
        max_checks: limit * 6 / 5,
        cost_max,
        skewed,
        event: event.map(|(e, at)| (e, (limit as f64 * at) as u64)),
        idle,
        rate,
    };
    let far = |name, cost_max| Variant {
        name,
        limit: 1_000_000_000,
        offered_units: u64::MAX,
        max_checks: far_checks,
        rate: 1_000_000,
        ..v(name, cost_max, false, None)
    };
    vec![
        v("uniform c=1", 1, false, None),
        v("uniform c=1..10", 10, false, None),
        v("skewed 50% c=1", 1, true, None),
        v("skewed 50% c=1..10", 10, true, None),
        Variant { replicas_setting: r as u64, ..v("uniform c=1 setting=R", 1, false, None) },
        Variant { replicas_setting: r as u64, ..v("uniform c=1..10 setting=R", 10, false, None) },
        v("crash@0.6L c=1", 1, false, Some((Event::Crash, 0.6))),
        v("crash@0.6L c=1..10", 10, false, Some((Event::Crash, 0.6))),
        Variant { idle: 100_000, ..v("quiet@0.9L idle=100ms", 1, false, Some((Event::Quiet, 0.9))) },
        far("far: L=1e9 c=1", 1),
        far("far: L=1e9 c=1..10", 10),
    ]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var("LEASE_SIM_QUICK").is_ok_and(|v| v == "1");
    let base = LeaseConfig::default();
    println!(
        "lease_sim: R replicas share one counter (limit L); max_block {}, store.lease.replicas {} (divisor {}) and \
         idle {:?} unless noted; Checks offered until 1.2·L units (far: a fixed count), {}",
        base.max_block,
        base.replicas,
        2 * base.replicas,
        base.idle,
        if quick { "quick sizes" } else { "full sizes" }
    );
    println!(
        "{:<26} {:>3} {:>4} {:>13} {:>10} {:>10} {:>9} {:>7} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8}",
        "variant",
        "R",
        "div",
        "L",
        "offered",
        "allowed",
        "refused",
        "unspent",
        "ref@avail",
        "max_avail",
        "bound",
        "stranded",
        "redis_ops",
        "ops/allow"
    );
    let mut far = Vec::new();
    for v in variants(quick, &base) {
        let o = run(&v, &base);
        let stranded = o.stranded.map_or_else(|| "-".to_owned(), |s| s.to_string());
        let per_allowed = o.ops as f64 / o.allowed.max(1) as f64;
        let bound = v.replicas as u64 * (base.max_block + v.cost_max - 1);
        println!(
            "{:<26} {:>3} {:>4} {:>13} {:>10} {:>10} {:>9} {:>7} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8.4}",
            v.name,
            v.replicas,
            2 * v.replicas_setting,
            v.limit,
            o.offered,
            o.allowed,
            o.refused,
            v.limit - o.spent,
            o.refused_avail,
            o.max_avail,
            bound,
            stranded,
            o.ops,
            per_allowed
        );
        if v.limit == 1_000_000_000 {
            far.push((v.cost_max, per_allowed));
        }
    }
    println!(
        "columns: offered, allowed, refused and ref@avail count Checks, the rest units; div = 2 · store.lease.replicas; \
         unspent = L − units allowed at the end; ref@avail = Checks refused while ≥ their cost was unspent \
         (stranded units count); max_avail = most units unspent at such a refusal; bound = R·(max_block + cost_max − 1)"
    );
    for (cost_max, per_allowed) in far {
        println!(
            "at limit 10^9 (far from it), cost 1..={cost_max}: {per_allowed:.4} Redis calls per allowed Check \
             (mean cost / max_block = {:.4})",
            (cost_max + 1) as f64 / 2.0 / base.max_block as f64
        );
    }
    println!(
        "bounds held: units allowed ≤ L; max_avail ≤ bound; unspent ≤ bound at the end of runs past L; \
         stranded ≤ max_block + cost_max − 1 and never spent"
    );
}
