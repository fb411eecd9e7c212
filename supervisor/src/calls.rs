//! The calls in flight on one plugin connection, and whether new ones may start.
//!
//! Pure bookkeeping — no I/O, no locks, no clocks: [`crate::conn::Conn`] keeps one
//! [`CallTable`] under one mutex and performs what it answers. Both call paths (async
//! callers and a host's engine thread) go through the same four operations — `begin`,
//! `complete`, `expire`, `abandon` — and the instance actor through `release`, `close`,
//! `idle` and `fail_all`. Keeping it pure lets the tests below run the hand-off between
//! callers, the reader and the actor in every order of their steps.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes a call id with one multiplication: ids are numbers this side hands out in
/// order, never chosen by the plugin, so SipHash's defence against chosen keys buys
/// nothing here and costs tens of ns on each call's way in and out. The odd constant
/// spreads consecutive ids over the high bits the table's probe uses.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; this is for completeness.
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Whether new calls may start on a connection. It only moves forward:
/// Held → Open → Closing, or Held → Closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// A new instance of a hot update: calls wait until the old one has handed over.
    Held,
    /// Calls start.
    Open,
    /// The instance is stopping or handed over: calls go to the next route.
    Closing,
}

/// How a reply met the table.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Completed<W> {
    /// The call was waiting: here is its waiter.
    Waiting(W),
    /// The call already ended (it missed its deadline, its caller left, or it was failed):
    /// a late reply, legal and dropped.
    Late,
    /// No call with this id was ever made: the plugin broke the protocol.
    Unknown,
}

/// What `expire` did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Expired {
    /// The call had already ended (its reply won the race): nothing was expired.
    NotPending,
    /// The call missed its deadline.
    Missed,
    /// It missed its deadline, and that makes `limit` in a row: the plugin is hung.
    Hung { limit: u32 },
}

/// The calls in flight on one connection, keyed by call id; `W` is what waits for each.
#[derive(Debug, Clone)]
pub(crate) struct CallTable<W> {
    gate: Gate,
    next_id: u64,
    pending: HashMap<u64, W, BuildHasherDefault<IdHasher>>,
    /// Calls in a row that missed their deadline (a reply resets it).
    missed: u32,
    /// That many in a row means hung (0: never).
    missed_limit: u32,
}

impl<W> CallTable<W> {
    /// An empty table; `held` for the new instance of a hot update.
    pub fn new(held: bool, missed_limit: u32) -> Self {
        CallTable {
            gate: if held { Gate::Held } else { Gate::Open },
            next_id: 1,
            pending: HashMap::default(),
            missed: 0,
            missed_limit,
        }
    }

    /// Whether calls may start now.
    pub fn gate(&self) -> Gate {
        self.gate
    }

    /// Starts a call: its id, or the waiter back with the gate that refused it.
    #[cfg(test)]
    pub fn begin(&mut self, waiter: W) -> Result<u64, (Gate, W)> {
        self.begin_as(waiter, false)
    }

    /// Starts a call; a `probe` (plugd's own health check) also starts on a held
    /// connection, whose instance must prove healthy before it is released.
    pub fn begin_as(&mut self, waiter: W, probe: bool) -> Result<u64, (Gate, W)> {
        if self.gate != Gate::Open && !(probe && self.gate == Gate::Held) {
            return Err((self.gate, waiter));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, waiter);
        Ok(id)
    }

    /// A reply to call `id` arrived.
    pub fn complete(&mut self, id: u64) -> Completed<W> {
        match self.pending.remove(&id) {
            Some(w) => {
                self.missed = 0;
                Completed::Waiting(w)
            }
            None if id != 0 && id < self.next_id => Completed::Late,
            None => Completed::Unknown,
        }
    }

    /// The waiter of call `id`, if it still waits (streamed pieces go to it).
    pub fn waiter(&mut self, id: u64) -> Option<&mut W> {
        self.pending.get_mut(&id)
    }

    /// Call `id`'s deadline passed before its reply. `count`: the miss counts toward hung
    /// (not while the plugin itself waits on a call it made to the host).
    pub fn expire(&mut self, id: u64, count: bool) -> Expired {
        if self.pending.remove(&id).is_none() {
            return Expired::NotPending;
        }
        if !count {
            return Expired::Missed;
        }
        self.missed += 1;
        if self.missed_limit > 0 && self.missed >= self.missed_limit {
            Expired::Hung { limit: self.missed_limit }
        } else {
            Expired::Missed
        }
    }

    /// Call `id`'s caller went away (not the plugin's fault: not counted as missed).
    /// True if it was still in flight.
    pub fn abandon(&mut self, id: u64) -> bool {
        self.pending.remove(&id).is_some()
    }

    /// Lets calls start (a hot update's hand-over is done). False if it was not held.
    pub fn release(&mut self) -> bool {
        let was = self.gate == Gate::Held;
        if was {
            self.gate = Gate::Open;
        }
        was
    }

    /// No new call starts from now on.
    pub fn close(&mut self) {
        self.gate = Gate::Closing;
    }

    /// Closed, and no call in flight: the instance may shut down or hand over.
    pub fn idle(&self) -> bool {
        self.gate == Gate::Closing && self.pending.is_empty()
    }

    /// How many calls are in flight.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Closes, and takes out every waiter `take` selects (the rest stay in flight).
    pub fn fail_all(&mut self, take: impl Fn(&W) -> bool) -> Vec<W> {
        self.close();
        let ids: Vec<u64> =
            self.pending.iter().filter(|(_, w)| take(w)).map(|(id, _)| *id).collect();
        ids.into_iter().filter_map(|id| self.pending.remove(&id)).collect()
    }
}

#[cfg(test)]
mod tests {
    //! A model check of the connection's hand-off. Each participant is a small program of
    //! steps; a step is what the real code does under one lock (the table's, the write
    //! buffer's), so running them in every order covers every interleaving the locks allow.
    //! The table is the real one; the socket is a list of frames.

    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Frame {
        Call(u64),
        Cancel(u64),
        Shutdown,
    }

    /// How a caller's call ended.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum End {
        Answered,
        DeadlineMissed,
        Failed,
        Refused,
    }

    #[derive(Debug, Clone)]
    struct Caller {
        pc: u8,
        id: u64,
        /// It may give up when its deadline passes.
        deadline: bool,
        /// It leaves before the reply (a dropped future).
        leaves: bool,
        ends: Vec<End>,
    }

    /// What the instance actor does after closing.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Stop {
        /// Wait until idle, then Shutdown.
        Drain,
        /// The drain timeout: fail what is in flight, then Shutdown.
        FailInFlight,
    }

    #[derive(Debug, Clone)]
    struct World {
        table: CallTable<usize>,
        callers: Vec<Caller>,
        /// Host → plugin, in write order.
        out: Vec<Frame>,
        /// How many of `out` the plugin has read.
        plugin_read: usize,
        /// Plugin → host replies not yet read.
        replies: Vec<u64>,
        actor_pc: u8,
        stop: Stop,
        violations: Vec<String>,
    }

    impl World {
        fn new(held: bool, stop: Stop, callers: &[(bool, bool)]) -> World {
            World {
                table: CallTable::new(held, 2),
                callers: callers
                    .iter()
                    .map(|&(deadline, leaves)| Caller {
                        pc: 0,
                        id: 0,
                        deadline,
                        leaves,
                        ends: Vec::new(),
                    })
                    .collect(),
                out: Vec::new(),
                plugin_read: 0,
                replies: Vec::new(),
                actor_pc: if held { 0 } else { 1 },
                stop,
                violations: Vec::new(),
            }
        }

        fn end(&mut self, who: usize, how: End) {
            self.callers[who].ends.push(how);
            self.callers[who].pc = 9;
        }

        /// Every step that can run now, as closures over a copy of the world.
        fn steps(&self) -> Vec<World> {
            let mut next = Vec::new();
            for i in 0..self.callers.len() {
                let c = &self.callers[i];
                match c.pc {
                    // begin, and the Call frame into the write buffer, under the table's
                    // lock (a held gate makes the caller wait: not enabled). Were the frame
                    // written after the lock, a drain timeout between the two would let it
                    // follow Shutdown; this check finds that.
                    0 if self.table.gate() != Gate::Held => {
                        let mut w = self.clone();
                        match w.table.begin(i) {
                            Ok(id) => {
                                if w.out.contains(&Frame::Shutdown) {
                                    w.violations.push(format!("call {id} written after Shutdown"));
                                }
                                w.out.push(Frame::Call(id));
                                w.callers[i].id = id;
                                w.callers[i].pc = 2;
                            }
                            Err((_, _)) => w.end(i, End::Refused),
                        }
                        next.push(w);
                    }
                    // wait: the deadline passes, or the caller leaves
                    2 if c.deadline || c.leaves => {
                        let mut w = self.clone();
                        let id = c.id;
                        if c.leaves {
                            if w.table.abandon(id) {
                                w.out.push(Frame::Cancel(id));
                            }
                            w.callers[i].pc = 9;
                        } else {
                            match w.table.expire(id, true) {
                                Expired::NotPending => {
                                    // The reply (or a failure) got there first and was
                                    // delivered under the same lock.
                                    if w.callers[i].ends.is_empty() {
                                        w.violations.push(format!("call {id} lost"));
                                    }
                                    w.callers[i].pc = 9;
                                }
                                Expired::Missed | Expired::Hung { .. } => {
                                    w.out.push(Frame::Cancel(id));
                                    w.end(i, End::DeadlineMissed);
                                }
                            }
                        }
                        next.push(w);
                    }
                    _ => {}
                }
            }
            // The plugin reads one frame and answers Calls (it exits on Shutdown).
            if self.plugin_read < self.out.len() {
                let mut w = self.clone();
                let frame = w.out[w.plugin_read];
                w.plugin_read += 1;
                if let Frame::Call(id) = frame {
                    w.replies.push(id);
                }
                next.push(w);
            }
            // The reader (the actor, or an engine thread) delivers one reply.
            if !self.replies.is_empty() {
                let mut w = self.clone();
                let id = w.replies.remove(0);
                match w.table.complete(id) {
                    Completed::Waiting(who) => {
                        if w.callers[who].pc == 9 && w.callers[who].ends.is_empty() {
                            w.violations.push("reply delivered to a caller that left".into());
                        }
                        w.callers[who].ends.push(End::Answered);
                        w.callers[who].pc = 9;
                    }
                    Completed::Late => {}
                    Completed::Unknown => {
                        w.violations.push(format!("reply to {id} seen as never made"))
                    }
                }
                next.push(w);
            }
            // The actor: release (if held), close, then drain or fail, then Shutdown.
            match self.actor_pc {
                0 => {
                    let mut w = self.clone();
                    w.table.release();
                    w.actor_pc = 1;
                    next.push(w);
                }
                1 => {
                    let mut w = self.clone();
                    w.table.close();
                    w.actor_pc = 2;
                    next.push(w);
                }
                2 if self.stop == Stop::Drain && self.table.idle() => {
                    let mut w = self.clone();
                    w.out.push(Frame::Shutdown);
                    w.actor_pc = 9;
                    next.push(w);
                }
                2 if self.stop == Stop::FailInFlight => {
                    let mut w = self.clone();
                    for who in w.table.fail_all(|_| true) {
                        w.callers[who].ends.push(End::Failed);
                        w.callers[who].pc = 9;
                    }
                    w.out.push(Frame::Shutdown);
                    w.actor_pc = 9;
                    next.push(w);
                }
                _ => {}
            }
            next
        }

        /// Checks a world where nothing can run any more.
        fn check_final(&self) -> Vec<String> {
            let mut bad = self.violations.clone();
            if self.actor_pc != 9 {
                bad.push("the actor never got to Shutdown (deadlock)".into());
            }
            for (i, c) in self.callers.iter().enumerate() {
                if c.pc != 9 {
                    bad.push(format!("caller {i} is stuck at step {}", c.pc));
                }
                if c.ends.len() > 1 {
                    bad.push(format!("caller {i}'s call ended twice: {:?}", c.ends));
                }
                if c.ends.is_empty() && !c.leaves {
                    bad.push(format!("caller {i}'s call never ended"));
                }
            }
            if self.table.in_flight() != 0 {
                bad.push(format!("{} calls left in the table", self.table.in_flight()));
            }
            bad
        }
    }

    /// A world's state with the table's map in a fixed order, to skip states already seen.
    fn key(w: &World) -> String {
        let t = &w.table;
        let pending: std::collections::BTreeMap<_, _> = t.pending.iter().collect();
        format!(
            "{:?}{}{:?}{}|{:?}{:?}{}{:?}{}{:?}",
            t.gate,
            t.next_id,
            pending,
            t.missed,
            w.callers,
            w.out,
            w.plugin_read,
            w.replies,
            w.actor_pc,
            w.violations
        )
    }

    /// Runs every interleaving from `start`; returns how many distinct states it went
    /// through and the first failure.
    fn explore(start: World) -> (usize, Option<(Vec<String>, World)>) {
        let mut stack = vec![start];
        let mut seen = std::collections::HashSet::new();
        while let Some(w) = stack.pop() {
            if !seen.insert(key(&w)) {
                continue;
            }
            let next = w.steps();
            if next.is_empty() {
                let bad = w.check_final();
                if !bad.is_empty() {
                    return (seen.len(), Some((bad, w)));
                }
            }
            stack.extend(next);
        }
        (seen.len(), None)
    }

    #[test]
    fn every_interleaving_of_callers_reader_and_a_stopping_actor_ends_each_call_once() {
        // (has a deadline, leaves early) per caller
        let mixes: &[&[(bool, bool)]] = &[
            &[(false, false), (false, false)],
            &[(true, false), (false, false)],
            &[(true, false), (true, false)],
            &[(false, true), (true, false)],
            &[(false, false), (false, true), (true, false)],
        ];
        let mut total = 0;
        for held in [false, true] {
            for stop in [Stop::Drain, Stop::FailInFlight] {
                for callers in mixes {
                    let (n, failure) = explore(World::new(held, stop, callers));
                    if let Some((bad, w)) = failure {
                        panic!("held={held} {stop:?} {callers:?}: {bad:?}\nin {w:#?}");
                    }
                    total += n;
                }
            }
        }
        // The search really branched (a broken generator would find one path).
        assert!(total > 5_000, "only {total} states explored");
    }

    #[test]
    fn missed_deadlines_in_a_row_make_hung_and_a_reply_resets_the_count() {
        let mut t = CallTable::<()>::new(false, 3);
        let ids: Vec<u64> = (0..5).map(|_| t.begin(()).unwrap()).collect();
        assert_eq!(t.expire(ids[0], true), Expired::Missed);
        assert_eq!(t.expire(ids[1], true), Expired::Missed);
        assert_eq!(t.complete(ids[2]), Completed::Waiting(()));
        assert_eq!(t.expire(ids[3], true), Expired::Missed, "the reply reset the count");
        assert_eq!(t.expire(ids[4], true), Expired::Missed);
        let last = t.begin(()).unwrap();
        assert_eq!(t.expire(last, true), Expired::Hung { limit: 3 });
        assert_eq!(t.expire(last, true), Expired::NotPending, "expired once");
        let left = t.begin(()).unwrap();
        assert!(t.abandon(left));
    }

    #[test]
    fn replies_are_late_for_ended_calls_and_unknown_for_calls_never_made() {
        let mut t = CallTable::<()>::new(false, 1);
        let waiting = t.begin(()).unwrap();
        assert_eq!(
            t.expire(waiting, false),
            Expired::Missed,
            "a plugin waiting on the host is not hung"
        );
        let mut t = CallTable::<()>::new(false, 0);
        let id = t.begin(()).unwrap();
        assert_eq!(t.expire(id, true), Expired::Missed, "limit 0 never says hung");
        assert_eq!(t.complete(id), Completed::Late);
        assert_eq!(t.complete(id + 1), Completed::Unknown);
        assert_eq!(t.complete(0), Completed::Unknown);
    }

    #[test]
    fn the_gate_only_moves_forward_and_refuses_with_the_waiter_back() {
        let mut t = CallTable::new(true, 0);
        assert_eq!(t.begin("a"), Err((Gate::Held, "a")));
        let probe = t.begin_as("probe", true).unwrap();
        assert!(matches!(t.complete(probe), Completed::Waiting("probe")));
        assert!(t.release());
        assert!(!t.release(), "released once");
        let id = t.begin("b").unwrap();
        t.close();
        assert_eq!(t.begin("c"), Err((Gate::Closing, "c")));
        assert!(!t.release(), "a closed gate stays closed");
        assert!(!t.idle(), "a call is in flight");
        assert_eq!(t.fail_all(|w| *w == "b"), vec!["b"]);
        assert!(t.idle());
        assert_eq!(t.complete(id), Completed::Late);
    }
}
