//! The one room that knows bincode.
//!
//! Every byte that crosses the plugin socket is encoded here, so the
//! serialization library can be swapped by editing this file alone. The wire
//! format is bincode 2.0.1 `config::standard()` (little-endian, variable-length
//! integers) driven through serde. JSON helpers for payloads live here too.

use serde::{de::DeserializeOwned, Serialize};

/// The bincode configuration used to encode: `standard()` (the decode side adds a limit).
fn wire_config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// Decodes with a limit on what the bytes may claim: bincode allocates a string or a
/// byte vector at the length the input announces before it reads it, so the limit is
/// what stops a short hostile input from costing megabytes. It is chosen from the
/// input's own size (the smallest step at least 8x its length, never above twice the
/// frame ceiling): a decode never allocates more than a small multiple of what was
/// received. Eight times, not once, because bincode also counts every integer at its
/// full width (a u64 sent as a one-byte varint claims 8), so a body right at the frame
/// limit claims more than it holds and must still decode.
fn decode_limited<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
    fn with<T: DeserializeOwned, const L: usize>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
        let config = bincode::config::standard().with_limit::<L>();
        bincode::serde::decode_from_slice::<T, _>(bytes, config)
            .map_err(|e| CodecError::Decode(e.to_string()))
    }
    const CEILING: usize = crate::frame::MAX_FRAME_CEILING as usize;
    match bytes.len().saturating_mul(8) {
        n if n <= 4 << 10 => with::<T, { 4 << 10 }>(bytes),
        n if n <= 64 << 10 => with::<T, { 64 << 10 }>(bytes),
        n if n <= 1 << 20 => with::<T, { 1 << 20 }>(bytes),
        n if n <= 16 << 20 => with::<T, { 16 << 20 }>(bytes),
        _ => with::<T, { 2 * CEILING }>(bytes),
    }
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
    let (value, used) = decode_limited::<T>(bytes)?;
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
