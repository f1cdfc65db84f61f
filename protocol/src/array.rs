//! An n-dimensional array: a dtype, a shape and C-order bytes.

use alloc::vec::Vec;
use bytes::Bytes;

use crate::{DType, Element, TreeError};

/// An n-dimensional array held as C-order (row-major), little-endian bytes.
///
/// The bytes are a [`Bytes`], so cloning an array, slicing it along axis 0 and
/// handing it to the transport never copies the data. Arrays received from the
/// wire start on a 64-byte boundary, so [`Array::as_slice`] is a view, not a copy.
#[derive(Clone, PartialEq, Eq)]
pub struct Array {
    dtype: DType,
    shape: Vec<usize>,
    data: Bytes,
}

/// Keeps a typed `Vec` alive behind a [`Bytes`] without copying it.
struct TypedVec<T>(Vec<T>);

impl<T: Element> AsRef<[u8]> for TypedVec<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// The number of elements of `shape`, or `None` on overflow.
pub(crate) fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// The number of bytes an array of `dtype` and `shape` occupies, or `None` on overflow.
pub(crate) fn byte_len(dtype: DType, shape: &[usize]) -> Option<usize> {
    element_count(shape)?.checked_mul(dtype.size())
}

impl Array {
    /// An array over existing bytes. Fails unless `data` holds exactly
    /// `product(shape) * dtype.size()` bytes, and, for bool, unless every byte
    /// is 0 or 1.
    pub fn new(
        dtype: DType,
        shape: impl Into<Vec<usize>>,
        data: impl Into<Bytes>,
    ) -> Result<Array, TreeError> {
        let shape = shape.into();
        let data = data.into();
        let expected = byte_len(dtype, &shape).ok_or(TreeError::SizeOverflow)?;
        if data.len() != expected {
            return Err(TreeError::DataLength {
                dtype,
                shape,
                expected,
                actual: data.len(),
            });
        }
        if dtype == DType::Bool {
            // Writers MUST send 0 or 1 (readers reject anything else), so a
            // bool array that could not be sent is refused here, where the
            // caller can still fix it.
            if let Some(index) = data.iter().position(|&b| b > 1) {
                return Err(TreeError::BadBool {
                    index,
                    byte: data[index],
                });
            }
        }
        Ok(Array { dtype, shape, data })
    }

    /// An array that takes ownership of `values` without copying them.
    pub fn from_vec<T: Element>(
        shape: impl Into<Vec<usize>>,
        values: Vec<T>,
    ) -> Result<Array, TreeError> {
        Array::new(T::DTYPE, shape, Bytes::from_owner(TypedVec(values)))
    }

    /// A one-dimensional array that takes ownership of `values` without copying.
    pub fn from_vec1<T: Element>(values: Vec<T>) -> Array {
        let n = values.len();
        Array::from_vec([n], values).expect("a 1-d shape always matches its own length")
    }

    /// An array holding a copy of `values`.
    pub fn from_slice<T: Element>(
        shape: impl Into<Vec<usize>>,
        values: &[T],
    ) -> Result<Array, TreeError> {
        Array::new(
            T::DTYPE,
            shape,
            Bytes::copy_from_slice(bytemuck::cast_slice(values)),
        )
    }

    /// A rank-0 array holding one value.
    pub fn scalar<T: Element>(value: T) -> Array {
        Array::from_vec1(alloc::vec![value]).reshape_unchecked(Vec::new())
    }

    /// A bool array (one byte per element, `0` or `1`).
    pub fn from_bools(shape: impl Into<Vec<usize>>, values: &[bool]) -> Result<Array, TreeError> {
        let bytes: Vec<u8> = values.iter().map(|&b| u8::from(b)).collect();
        Array::new(DType::Bool, shape, bytes)
    }

    /// An array of zero bytes (zero for every dtype, `false` for bool).
    pub fn zeros(dtype: DType, shape: impl Into<Vec<usize>>) -> Result<Array, TreeError> {
        let shape = shape.into();
        let len = byte_len(dtype, &shape).ok_or(TreeError::SizeOverflow)?;
        Array::new(dtype, shape, alloc::vec![0u8; len])
    }

    /// An array whose data the decoder attaches once it has arrived.
    pub(crate) fn placeholder(dtype: DType, shape: Vec<usize>) -> Array {
        Array {
            dtype,
            shape,
            data: Bytes::new(),
        }
    }

    /// Gives a placeholder its data; the decoder has checked the length.
    pub(crate) fn attach(&mut self, data: Bytes) {
        debug_assert_eq!(byte_len(self.dtype, &self.shape), Some(data.len()));
        self.data = data;
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The length of each axis; empty for a rank-0 (scalar) array.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of axes.
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    /// The number of elements (1 for a rank-0 array, 0 if any axis is 0).
    pub fn len(&self) -> usize {
        // Cannot overflow: checked when the array was made.
        self.data.len() / self.dtype.size()
    }

    /// True when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The size of the data in bytes.
    pub fn nbytes(&self) -> usize {
        self.data.len()
    }

    /// The raw C-order, little-endian bytes.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Takes the raw bytes out of the array.
    pub fn into_data(self) -> Bytes {
        self.data
    }

    /// Splits the array into its dtype, shape and bytes.
    pub fn into_parts(self) -> (DType, Vec<usize>, Bytes) {
        (self.dtype, self.shape, self.data)
    }

    /// The same bytes seen with another shape holding the same number of elements.
    pub fn reshape(self, shape: impl Into<Vec<usize>>) -> Result<Array, TreeError> {
        Array::new(self.dtype, shape, self.data)
    }

    fn reshape_unchecked(mut self, shape: Vec<usize>) -> Array {
        debug_assert_eq!(element_count(&shape), Some(self.len()));
        self.shape = shape;
        self
    }

    /// True when the data starts at a multiple of `align` bytes in memory.
    pub fn is_aligned_to(&self, align: usize) -> bool {
        (self.data.as_ptr() as usize) % align == 0
    }

    /// Checks that the array holds `T`s.
    fn check_dtype<T: Element>(&self) -> Result<(), TreeError> {
        if self.dtype != T::DTYPE {
            return Err(TreeError::WrongDType {
                expected: T::DTYPE,
                found: self.dtype,
            });
        }
        if cfg!(target_endian = "big") && self.dtype.size() > 1 {
            return Err(TreeError::BigEndianHost);
        }
        Ok(())
    }

    /// The elements as a typed slice, without copying.
    ///
    /// Fails if the dtype is not `T`'s, or if the bytes are not aligned for `T`
    /// (arrays from the wire always are; an array made by slicing arbitrary bytes
    /// may not be: use [`Array::to_vec`] then).
    pub fn as_slice<T: Element>(&self) -> Result<&[T], TreeError> {
        self.check_dtype::<T>()?;
        if self.data.is_empty() {
            // An empty `Bytes` may point anywhere; no element is read.
            return Ok(&[]);
        }
        bytemuck::try_cast_slice(&self.data).map_err(|_| TreeError::Misaligned {
            dtype: self.dtype,
            align: core::mem::align_of::<T>(),
        })
    }

    /// A copy of the elements, whatever the alignment of the bytes.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, TreeError> {
        self.check_dtype::<T>()?;
        Ok(bytemuck::pod_collect_to_vec(&self.data))
    }

    /// A copy of a bool array's elements. Any non-zero byte reads as `true`.
    pub fn to_bools(&self) -> Result<Vec<bool>, TreeError> {
        if self.dtype != DType::Bool {
            return Err(TreeError::WrongDType {
                expected: DType::Bool,
                found: self.dtype,
            });
        }
        Ok(self.data.iter().map(|&b| b != 0).collect())
    }

    /// The sub-array at `index` along axis 0, sharing this array's bytes.
    pub fn index_axis0(&self, index: usize) -> Result<Array, TreeError> {
        let (&first, rest) = self.shape.split_first().ok_or(TreeError::RankZero)?;
        if index >= first {
            return Err(TreeError::IndexOutOfRange { index, len: first });
        }
        // Cannot overflow: the whole array's size was checked.
        let row = self.data.len() / first.max(1);
        let start = index * row;
        Ok(Array {
            dtype: self.dtype,
            shape: rest.to_vec(),
            data: self.data.slice(start..start + row),
        })
    }
}

/// The dtype and shape, as `float32[2, 3]`.
impl core::fmt::Display for Array {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}{:?}", self.dtype.name(), self.shape)
    }
}

impl core::fmt::Debug for Array {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Never dump megabytes of data into a log line.
        f.debug_struct("Array")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("nbytes", &self.data.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_bool_array_holds_only_0_and_1() {
        assert!(Array::new(DType::Bool, [3], alloc::vec![0u8, 1, 0]).is_ok());
        assert_eq!(
            Array::new(DType::Bool, [3], alloc::vec![0u8, 2, 1]).unwrap_err(),
            TreeError::BadBool { index: 1, byte: 2 }
        );
    }

    use super::*;
    use alloc::vec;

    #[test]
    fn new_checks_length() {
        assert!(Array::new(DType::F32, [2, 3], vec![0u8; 24]).is_ok());
        let err = Array::new(DType::F32, [2, 3], vec![0u8; 23]).unwrap_err();
        assert!(matches!(
            err,
            TreeError::DataLength {
                expected: 24,
                actual: 23,
                ..
            }
        ));
        assert!(matches!(
            Array::new(DType::F64, [usize::MAX, 2], Bytes::new()),
            Err(TreeError::SizeOverflow)
        ));
    }

    #[test]
    fn from_vec_is_zero_copy_and_typed_access_works() {
        let v: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let ptr = v.as_ptr() as usize;
        let a = Array::from_vec([3, 4], v).unwrap();
        assert_eq!(a.data().as_ptr() as usize, ptr);
        assert_eq!(a.as_slice::<f32>().unwrap()[5], 5.0);
        assert!(matches!(
            a.as_slice::<i32>(),
            Err(TreeError::WrongDType {
                expected: DType::I32,
                found: DType::F32
            })
        ));
        assert_eq!(a.len(), 12);
        assert_eq!(a.nbytes(), 48);
    }

    #[test]
    fn misaligned_view_is_an_error_but_copy_works() {
        let raw = Bytes::from(vec![0u8; 17]);
        let a = Array::new(DType::F64, [2], raw.slice(1..17)).unwrap();
        if !a.is_aligned_to(8) {
            assert!(matches!(
                a.as_slice::<f64>(),
                Err(TreeError::Misaligned { .. })
            ));
        }
        assert_eq!(a.to_vec::<f64>().unwrap(), vec![0.0, 0.0]);
    }

    #[test]
    fn empty_and_scalar_arrays() {
        let e = Array::zeros(DType::I16, [0, 5]).unwrap();
        assert!(e.is_empty());
        assert_eq!(e.as_slice::<i16>().unwrap().len(), 0);
        let s = Array::scalar(7u64);
        assert_eq!(s.ndim(), 0);
        assert_eq!(s.len(), 1);
        assert_eq!(s.as_slice::<u64>().unwrap(), &[7]);
    }

    #[test]
    fn index_axis0_shares_bytes() {
        let a = Array::from_vec([3, 2], vec![1i32, 2, 3, 4, 5, 6]).unwrap();
        let row = a.index_axis0(1).unwrap();
        assert_eq!(row.shape(), &[2]);
        assert_eq!(row.as_slice::<i32>().unwrap(), &[3, 4]);
        assert!(matches!(
            a.index_axis0(3),
            Err(TreeError::IndexOutOfRange { index: 3, len: 3 })
        ));
        assert!(matches!(
            Array::scalar(1i8).index_axis0(0),
            Err(TreeError::RankZero)
        ));
    }

    #[test]
    fn bools() {
        let a = Array::from_bools([3], &[true, false, true]).unwrap();
        assert_eq!(a.to_bools().unwrap(), vec![true, false, true]);
        assert!(a.to_vec::<u8>().is_err());
    }
}
