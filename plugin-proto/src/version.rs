//! Protocol version negotiation.
//!
//! A plugin announces the range of protocol versions it speaks; the supervisor
//! picks the highest version in both ranges, or rejects the plugin.

/// `b"PLGD"` read as a little-endian u32: the first field of every Hello.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PLGD");

/// Lowest protocol version this crate speaks.
pub const PROTO_MIN: u16 = 1;

/// Highest protocol version this crate speaks. Version 2 adds host calls: a plugin may
/// send `Call` (and `Cancel`) to the supervisor, which answers with `Reply`. Version 3
/// adds `CallCfg`, a call with the caller's per-call configuration. Version 4 lets a
/// plugin on shared memory call the host through the rings (PROTOCOL.md section 1).
pub const PROTO_MAX: u16 = 4;

/// The first protocol version in which a plugin may call the host.
pub const PROTO_HOST_CALLS: u16 = 2;

/// The first protocol version in which a call may carry a per-call configuration.
pub const PROTO_CALL_CFG: u16 = 3;

/// The first protocol version in which a plugin on shared memory may put its calls to the
/// host on the replies ring, and the supervisor answers them on the calls ring.
pub const PROTO_RING_HOST_CALLS: u16 = 4;

/// Returns the highest version in both `ours` and `theirs`, if any.
pub fn negotiate(ours: (u16, u16), theirs: (u16, u16)) -> Option<u16> {
    let lo = ours.0.max(theirs.0);
    let hi = ours.1.min(theirs.1);
    (lo <= hi && theirs.0 <= theirs.1).then_some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_highest_common_version() {
        assert_eq!(negotiate((1, 3), (2, 5)), Some(3));
        assert_eq!(negotiate((1, 1), (1, 1)), Some(1));
    }

    #[test]
    fn disjoint_or_inverted_ranges_fail() {
        assert_eq!(negotiate((1, 1), (2, 4)), None);
        assert_eq!(negotiate((3, 4), (1, 2)), None);
        assert_eq!(negotiate((1, 5), (4, 2)), None);
    }

    #[test]
    fn magic_spells_plgd() {
        assert_eq!(MAGIC.to_le_bytes(), *b"PLGD");
    }
}
