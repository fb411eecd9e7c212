//! The one room that knows bincode.
//!
//! Every byte that crosses the plugin socket is encoded here, so the
//! serialization library can be swapped by editing this file alone. The wire
//! format is bincode 2.0.1 `config::standard()` (little-endian, variable-length
//! integers) driven through serde. JSON helpers for payloads live here too.

use serde::{de::DeserializeOwned, Serialize};

/// The bincode configuration used on the wire: `standard()`, with a decode
/// limit so that a hostile length inside a frame can never make the decoder
/// allocate more than twice what a frame may hold.
///
/// Twice, not once: bincode counts every integer at its full width against the limit
/// (a u64 sent as a one-byte varint claims 8), so a body right at the frame limit claims
/// a few bytes more than it holds, and must still decode. The frame length itself is
/// checked against the limit before anything is read (see `frame::body_len`).
fn wire_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 2 * crate::frame::MAX_FRAME_CEILING as usize }>()
}

/// An encoding or decoding failure, with the codec's own explanation.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value could not be encoded (for example a map with non-string keys in JSON).
    #[error("cannot encode value: {0}")]
    Encode(String),
    /// The bytes are not a valid encoding of the expected type.
    #[error("cannot decode value: {0}")]
    Decode(String),
    /// The bytes decoded but some were left over, which a well-formed peer never sends.
    #[error("cannot decode value: {0} trailing bytes after the value")]
    Trailing(usize),
}

/// Appends the bincode encoding of `value` to `out`.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(value, out, wire_config())
        .map(|_| ())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Returns the bincode encoding of `value`.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    // Room for a typical small message up front: growing from empty would take three
    // allocations (8, 16, 32 bytes) to encode a 25-byte tick.
    let mut out = Vec::with_capacity(64);
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Decodes exactly one value from `bytes`; leftover bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(bytes, wire_config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

/// Returns the JSON encoding of `value` (the payload codec for tooling and other languages).
pub fn json_encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    serde_json::to_vec(value).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes a JSON payload.
pub fn json_decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    serde_json::from_slice(bytes).map_err(|e| CodecError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_varint_little_endian() {
        assert_eq!(encode(&7u64).unwrap(), vec![7]);
        assert_eq!(encode(&251u64).unwrap(), vec![251, 251, 0]);
        assert_eq!(encode(&0x1234_5678u32).unwrap(), vec![252, 0x78, 0x56, 0x34, 0x12]);
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        assert!(matches!(decode::<u8>(&[1, 2]), Err(CodecError::Trailing(1))));
    }

    #[test]
    fn huge_claimed_length_fails_without_allocating_it() {
        // A string claiming 2^60 bytes: varint tag 253 (u64) + 8 bytes.
        let mut bytes = vec![253];
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode::<String>(&bytes).is_err());
        assert!(decode::<serde_bytes::ByteBuf>(&bytes).is_err());
        assert!(decode::<Vec<u64>>(&bytes).is_err());
    }
}
