//! Random (version 4) UUIDs in their text form: Envoy's `x-request-id`, Kong's entity ids and
//! correlation ids.

/// A random version 4 UUID as 36 ASCII bytes (`xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`).
pub fn v4_bytes() -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = (fastrand::u128(..) & !(0xf000 << 64) & !(0xc << 60)) | (0x4000 << 64) | (0x8 << 60);
    let mut out = [0u8; 36];
    let mut nibble = 0;
    for (i, byte) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            *byte = b'-';
        } else {
            *byte = HEX[((n >> (124 - 4 * nibble)) & 0xf) as usize];
            nibble += 1;
        }
    }
    out
}

/// A random version 4 UUID.
pub fn v4() -> String {
    v4_bytes().iter().map(|&b| char::from(b)).collect()
}
