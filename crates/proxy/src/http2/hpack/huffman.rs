//! Huffman decoding of HPACK string literals (RFC 7541 §5.2, code in Appendix B).
//!
//! The code is canonical: sorted by length and then by symbol, each code is the previous one
//! plus one (shifted left when the length grows). So the whole code is described by the
//! symbols in that order and the number of codes of each length, and a symbol is found by
//! comparing the next 32 bits, left-aligned, against the upper bound of each length's codes.
//! meshgate never Huffman-encodes: it sends string literals raw (allowed by §5.2), which
//! costs a few bytes on the wire and no CPU.

/// The 257 symbols (256 octets and EOS) in code order: by code length, then by value.
pub(super) const SYMBOLS: [u16; 257] = [
    48, 49, 50, 97, 99, 101, 105, 111, 115, 116, 32, 37, 45, 46, 47, 51, 52, 53, 54, 55, 56, 57, 61, 65, 95, 98, 100,
    102, 103, 104, 108, 109, 110, 112, 114, 117, 58, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81,
    82, 83, 84, 85, 86, 87, 89, 106, 107, 113, 118, 119, 120, 121, 122, 38, 42, 44, 59, 88, 90, 33, 34, 40, 41, 63, 39,
    43, 124, 35, 62, 0, 36, 64, 91, 93, 126, 94, 125, 60, 96, 123, 92, 195, 208, 128, 130, 131, 162, 184, 194, 224,
    226, 153, 161, 167, 172, 176, 177, 179, 209, 216, 217, 227, 229, 230, 129, 132, 133, 134, 136, 146, 154, 156, 160,
    163, 164, 169, 170, 173, 178, 181, 185, 186, 187, 189, 190, 196, 198, 228, 232, 233, 1, 135, 137, 138, 139, 140,
    141, 143, 147, 149, 150, 151, 152, 155, 157, 158, 165, 166, 168, 174, 175, 180, 182, 183, 188, 191, 197, 231, 239,
    9, 142, 144, 145, 148, 159, 171, 206, 215, 225, 236, 237, 199, 207, 234, 235, 192, 193, 200, 201, 202, 205, 210,
    213, 218, 219, 238, 240, 242, 243, 255, 203, 204, 211, 212, 214, 221, 222, 223, 241, 244, 245, 246, 247, 248, 250,
    251, 252, 253, 254, 2, 3, 4, 5, 6, 7, 8, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 23, 24, 25, 26, 27, 28, 29, 30,
    31, 127, 220, 249, 10, 13, 22, 256,
];

/// How many codes have each length (index = length in bits, 0..=30).
pub(super) const CODES_OF_LENGTH: [u16; 31] = [
    0, 0, 0, 0, 0, 10, 26, 32, 6, 0, 5, 3, 2, 6, 2, 3, 0, 0, 0, 3, 8, 13, 26, 29, 12, 4, 15, 19, 29, 0, 4,
];

/// End of string; it must never appear in a decoded string (§5.2).
const EOS: u16 = 256;

/// Per code length: the first code, the index in `SYMBOLS` of its symbol, and the exclusive
/// upper bound of that length's codes, left-aligned in 32 bits.
struct Lengths {
    first_code: [u32; 31],
    first_symbol: [u16; 31],
    limit: [u64; 31],
}

const LENGTHS: Lengths = {
    let mut lengths = Lengths {
        first_code: [0; 31],
        first_symbol: [0; 31],
        limit: [0; 31],
    };
    let mut code = 0u32;
    let mut symbol = 0u16;
    let mut len = 1;
    while len <= 30 {
        lengths.first_code[len] = code;
        lengths.first_symbol[len] = symbol;
        let count = CODES_OF_LENGTH[len] as u32;
        lengths.limit[len] = ((code + count) as u64) << (32 - len);
        code = (code + count) << 1;
        symbol += count as u16;
        len += 1;
    }
    lengths
};

/// The shortest code is 5 bits long.
const SHORTEST: usize = 5;

/// Appends the decoded octets of `input` to `out`. Fails on an EOS symbol, on padding longer
/// than 7 bits, and on padding that is not the most significant bits of EOS (all ones).
pub fn decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
    // Pending bits, right-aligned in `bits`; `count` of them are valid.
    let mut bits: u64 = 0;
    let mut count: usize = 0;
    let mut next = input.iter();
    out.reserve(input.len() * 8 / 5);
    loop {
        // Up to 64 bits: a 30-bit code must be complete whenever input remains.
        while count <= 64 - 8 {
            match next.next() {
                Some(&b) => {
                    bits = (bits << 8) | u64::from(b);
                    count += 8;
                }
                None => break,
            }
        }
        if count == 0 {
            return Ok(());
        }
        // The next 32 bits, padded with ones past the end of the input.
        let window = if count >= 32 {
            bits >> (count - 32)
        } else {
            ((bits << (32 - count)) | ((1u64 << (32 - count)) - 1)) & 0xffff_ffff
        };
        let mut len = SHORTEST;
        while window >= LENGTHS.limit[len] {
            len += 1;
        }
        if len > count {
            // Only padding can be left: up to 7 bits, all ones.
            return if count <= 7 && bits == (1u64 << count) - 1 {
                Ok(())
            } else {
                Err("invalid Huffman padding")
            };
        }
        let code = (window >> (32 - len)) as u32;
        let symbol = SYMBOLS[usize::from(LENGTHS.first_symbol[len]) + (code - LENGTHS.first_code[len]) as usize];
        if symbol == EOS {
            return Err("EOS in a Huffman-coded string");
        }
        out.push(symbol as u8);
        count -= len;
        bits &= (1u64 << count) - 1;
    }
}
