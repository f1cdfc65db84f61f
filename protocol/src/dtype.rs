//! Element types of arrays and their one-byte wire codes.
//!
//! The code table follows DLPack's idea (a small closed set of numeric types) but
//! packs it into one byte. Codes are part of the wire format: never renumber them.

use core::fmt;

/// The element type of an [`Array`](crate::Array).
///
/// All multi-byte types are little endian on the wire and in memory on the
/// platforms this crate supports for typed access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DType {
    /// One byte per element, `0` or `1`.
    Bool,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16 (the upper half of an f32).
    BF16,
    F32,
    F64,
    /// Two f32: real then imaginary.
    Complex64,
    /// Two f64: real then imaginary.
    Complex128,
}

impl DType {
    /// Every dtype, in code order.
    pub const ALL: [DType; 15] = [
        DType::Bool,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::Complex64,
        DType::Complex128,
    ];

    /// The byte that names this dtype on the wire.
    pub const fn code(self) -> u8 {
        match self {
            DType::Bool => 0,
            DType::I8 => 1,
            DType::I16 => 2,
            DType::I32 => 3,
            DType::I64 => 4,
            DType::U8 => 5,
            DType::U16 => 6,
            DType::U32 => 7,
            DType::U64 => 8,
            DType::F16 => 9,
            DType::BF16 => 10,
            DType::F32 => 11,
            DType::F64 => 12,
            DType::Complex64 => 13,
            DType::Complex128 => 14,
        }
    }

    /// The dtype for a wire code, or `None` for a code this version does not know.
    pub const fn from_code(code: u8) -> Option<DType> {
        if (code as usize) < DType::ALL.len() {
            Some(DType::ALL[code as usize])
        } else {
            None
        }
    }

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::Bool | DType::I8 | DType::U8 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 | DType::Complex64 => 8,
            DType::Complex128 => 16,
        }
    }

    /// The NumPy-style name (`"float32"`, `"bfloat16"`, ...), used in error messages.
    pub const fn name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::Complex64 => "complex64",
            DType::Complex128 => "complex128",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust type whose values can be viewed in place as array elements.
///
/// Implemented for the fixed-width numeric types, [`half::f16`], [`half::bf16`] and
/// [`num_complex::Complex`] of `f32`/`f64`. `bool` is not an `Element` because not
/// every byte is a valid `bool`; use [`Array::to_bools`](crate::Array::to_bools).
/// Sealed: the set of dtypes is fixed by the wire format.
pub trait Element: bytemuck::Pod + sealed::Sealed + Send + Sync + 'static {
    /// The dtype this Rust type corresponds to.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(
            impl sealed::Sealed for $t {}
            impl Element for $t {
                const DTYPE: DType = DType::$d;
            }
        )*
    };
}

element! {
    i8 => I8, i16 => I16, i32 => I32, i64 => I64,
    u8 => U8, u16 => U16, u32 => U32, u64 => U64,
    half::f16 => F16, half::bf16 => BF16,
    f32 => F32, f64 => F64,
    num_complex::Complex<f32> => Complex64,
    num_complex::Complex<f64> => Complex128,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_dense() {
        for (i, d) in DType::ALL.iter().enumerate() {
            assert_eq!(d.code() as usize, i);
            assert_eq!(DType::from_code(d.code()), Some(*d));
        }
        assert_eq!(DType::from_code(15), None);
        assert_eq!(DType::from_code(255), None);
    }

    #[test]
    fn sizes_match_rust_types() {
        assert_eq!(
            DType::Complex64.size(),
            core::mem::size_of::<num_complex::Complex<f32>>()
        );
        assert_eq!(
            DType::Complex128.size(),
            core::mem::size_of::<num_complex::Complex<f64>>()
        );
        assert_eq!(DType::BF16.size(), core::mem::size_of::<half::bf16>());
        assert_eq!(<f32 as Element>::DTYPE, DType::F32);
    }
}
