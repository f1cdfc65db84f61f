//! Conversions between [`Array`] and [`ndarray`] arrays (the `ndarray` feature).
//!
//! | from                                  | to                   | copies?                                        |
//! |---------------------------------------|----------------------|------------------------------------------------|
//! | owned `ndarray::Array<T, D>`          | [`Array`], [`Tree`]  | no, if in standard (C) layout; else one copy   |
//! | any `ndarray` array or view (`&`)     | [`Array`]            | one copy                                       |
//! | [`Array`]                             | `ArrayViewD<T>`      | no (the bytes must be aligned for `T`)         |
//! | [`Array`]                             | `ArrayD<T>`          | one copy                                       |
//! | `ndarray::Array<bool, D>` / [`Array`] | the other            | one copy (not every byte is a valid `bool`)    |
//!
//! `T` is any [`Element`]: the fixed-width integers, `f32`, `f64`, `f16`, `bf16`
//! and the complex types.

use alloc::vec::Vec;

use ndarray::{ArrayBase, ArrayD, ArrayViewD, Data, Dimension, IxDyn};

use crate::{Array, DType, Element, Tree, TreeError};

impl Array {
    /// An array that takes over an `ndarray` array's buffer.
    ///
    /// No element is copied when `a` is in standard (C-contiguous) layout, which
    /// every freshly made `ndarray` array is; otherwise the elements are copied
    /// once into C order. Also available as `Array::from(a)` and `Tree::from(a)`.
    ///
    /// ```
    /// use teleport_protocol::Array;
    /// let a = ndarray::Array2::<f32>::from_shape_fn((2, 3), |(i, j)| (i * 3 + j) as f32);
    /// let ptr = a.as_ptr();
    /// let array = Array::from_ndarray(a);
    /// assert_eq!(array.shape(), &[2, 3]);
    /// assert_eq!(array.as_slice::<f32>().unwrap().as_ptr(), ptr); // not copied
    /// assert_eq!(array.view::<f32>().unwrap()[[1, 2]], 5.0);
    /// ```
    pub fn from_ndarray<T: Element, D: Dimension>(a: ndarray::Array<T, D>) -> Array {
        if !a.is_standard_layout() {
            return Array::copy_from_ndarray(&a);
        }
        let shape = a.shape().to_vec();
        let len = a.len();
        let (vec, offset) = a.into_raw_vec_and_offset();
        // `offset` is `None` only for an empty array. In standard layout the
        // elements are `vec[offset..offset + len]`: `vec` may hold more when the
        // array was sliced.
        let start = offset.unwrap_or(0);
        debug_assert!(start + len <= vec.len());
        let size = core::mem::size_of::<T>();
        let data = Array::from_vec1(vec)
            .into_data()
            .slice(start * size..(start + len) * size);
        Array::new(T::DTYPE, shape, data)
            .expect("an ndarray array's shape matches its element count")
    }

    /// An array holding a copy of the elements of any `ndarray` array or view, in
    /// C order.
    pub fn copy_from_ndarray<S, T, D>(a: &ArrayBase<S, D>) -> Array
    where
        S: Data<Elem = T>,
        T: Element,
        D: Dimension,
    {
        let values: Vec<T> = match a.as_slice() {
            Some(slice) => slice.to_vec(),
            None => a.iter().copied().collect(),
        };
        Array::from_vec(a.shape(), values)
            .expect("an ndarray array's shape matches its element count")
    }

    /// A bool array holding a copy of an `ndarray` array of `bool`s.
    pub fn from_ndarray_bool<S, D>(a: &ArrayBase<S, D>) -> Array
    where
        S: Data<Elem = bool>,
        D: Dimension,
    {
        let bytes: Vec<u8> = a.iter().map(|&b| u8::from(b)).collect();
        Array::new(DType::Bool, a.shape(), bytes)
            .expect("an ndarray array's shape matches its element count")
    }

    /// A typed `ndarray` view of the elements, without copying.
    ///
    /// Fails if the dtype is not `T`'s, or if the bytes are not aligned for `T`
    /// (arrays from the wire and from this crate's constructors always are); use
    /// [`Array::to_ndarray`] to copy instead.
    pub fn view<T: Element>(&self) -> Result<ArrayViewD<'_, T>, TreeError> {
        let slice = self.as_slice::<T>()?;
        ArrayViewD::from_shape(IxDyn(self.shape()), slice).map_err(|_| too_large())
    }

    /// A copy of the elements as an `ndarray` array, whatever their alignment.
    ///
    /// Use `.into_dimensionality::<ndarray::Ix2>()` (for example) on the result
    /// for a fixed number of axes.
    pub fn to_ndarray<T: Element>(&self) -> Result<ArrayD<T>, TreeError> {
        ArrayD::from_shape_vec(IxDyn(self.shape()), self.to_vec::<T>()?).map_err(|_| too_large())
    }

    /// A copy of a bool array as an `ndarray` array of `bool`s. Any non-zero byte
    /// reads as `true`.
    pub fn to_ndarray_bool(&self) -> Result<ArrayD<bool>, TreeError> {
        ArrayD::from_shape_vec(IxDyn(self.shape()), self.to_bools()?).map_err(|_| too_large())
    }
}

/// `ndarray` refuses shapes whose non-zero axes multiply past `isize::MAX`
/// elements; an [`Array`] with a zero-length axis beside huge ones can have one.
/// (A shape and a slice of matching length give no other error.)
fn too_large() -> TreeError {
    TreeError::SizeOverflow
}

/// Takes the buffer over without copying when `a` is in standard layout; see
/// [`Array::from_ndarray`].
impl<T: Element, D: Dimension> From<ndarray::Array<T, D>> for Array {
    fn from(a: ndarray::Array<T, D>) -> Array {
        Array::from_ndarray(a)
    }
}

/// Copies the elements; see [`Array::from_ndarray_bool`].
impl<D: Dimension> From<ndarray::Array<bool, D>> for Array {
    fn from(a: ndarray::Array<bool, D>) -> Array {
        Array::from_ndarray_bool(&a)
    }
}

/// An array leaf; see [`Array::from_ndarray`].
impl<T: Element, D: Dimension> From<ndarray::Array<T, D>> for Tree {
    fn from(a: ndarray::Array<T, D>) -> Tree {
        Tree::Array(Array::from_ndarray(a))
    }
}

/// A bool array leaf; see [`Array::from_ndarray_bool`].
impl<D: Dimension> From<ndarray::Array<bool, D>> for Tree {
    fn from(a: ndarray::Array<bool, D>) -> Tree {
        Tree::Array(Array::from_ndarray_bool(&a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{bf16, f16, tree, Complex32, Complex64};
    use alloc::vec;
    // `ndarray::s!` expands to unsafe code, which this crate forbids.
    use ndarray::{Array1, Array2, Array3, ArrayD, Axis, Ix2, Slice};

    #[test]
    fn standard_layout_is_taken_over_without_copying() {
        let a = Array2::<i32>::from_shape_vec((3, 4), (0..12).collect()).unwrap();
        let ptr = a.as_ptr() as usize;
        let array = Array::from(a);
        assert_eq!(array.dtype(), DType::I32);
        assert_eq!(array.shape(), &[3, 4]);
        assert_eq!(array.data().as_ptr() as usize, ptr);
        let view = array.view::<i32>().unwrap();
        assert_eq!(view.as_ptr() as usize, ptr);
        assert_eq!(view.shape(), &[3, 4]);
        assert_eq!(view[[2, 1]], 9);
    }

    #[test]
    fn sliced_standard_layout_keeps_its_offset_without_copying() {
        // Rows 1.. of a C-order array are still in standard layout, at an offset.
        let a = Array2::<u16>::from_shape_vec((4, 3), (0..12).collect()).unwrap();
        let rows = a.slice_axis_move(Axis(0), Slice::from(1..));
        assert!(rows.is_standard_layout());
        let ptr = rows.as_ptr() as usize;
        let array = Array::from_ndarray(rows);
        assert_eq!(array.shape(), &[3, 3]);
        assert_eq!(array.data().as_ptr() as usize, ptr);
        assert_eq!(
            array.to_vec::<u16>().unwrap(),
            (3..12).collect::<Vec<u16>>()
        );
    }

    #[test]
    fn other_layouts_are_copied_into_c_order() {
        let a = Array2::<f64>::from_shape_vec((2, 3), vec![1., 2., 3., 4., 5., 6.]).unwrap();
        let t = a.reversed_axes(); // Fortran order
        assert!(!t.is_standard_layout());
        let array = Array::from_ndarray(t);
        assert_eq!(array.shape(), &[3, 2]);
        assert_eq!(array.as_slice::<f64>().unwrap(), &[1., 4., 2., 5., 3., 6.]);

        let b = Array2::<i8>::from_shape_vec((3, 4), (0..12).collect()).unwrap();
        let cols = b.slice_axis(Axis(1), Slice::new(1, None, 2));
        let array = Array::copy_from_ndarray(&cols);
        assert_eq!(array.shape(), &[3, 2]);
        assert_eq!(array.as_slice::<i8>().unwrap(), &[1, 3, 5, 7, 9, 11]);
        let array = Array::from_ndarray(b.slice_axis_move(Axis(0), Slice::new(0, None, -1)));
        assert_eq!(array.as_slice::<i8>().unwrap()[..4], [8, 9, 10, 11]);
    }

    #[test]
    fn round_trips_every_element_type() {
        fn check<T: Element + PartialEq + core::fmt::Debug>(values: Vec<T>) {
            let a = Array2::from_shape_vec((2, values.len() / 2), values).unwrap();
            let array = Array::from(a.clone());
            assert_eq!(array.dtype(), T::DTYPE);
            assert_eq!(array.view::<T>().unwrap(), a.view().into_dyn());
            let back = array.to_ndarray::<T>().unwrap();
            assert_eq!(back.into_dimensionality::<Ix2>().unwrap(), a);
        }
        check(vec![1u8, 2, 3, 4]);
        check(vec![-1i64, 2, -3, 4]);
        check(vec![1.5f32, 2., 3., 4.]);
        check(vec![f16::from_f32(1.5), f16::ONE, f16::ZERO, f16::NEG_ONE]);
        check(vec![bf16::from_f32(1.5), bf16::ONE, bf16::ZERO, bf16::MAX]);
        check(vec![Complex32::new(1., 2.), Complex32::new(3., -4.)]);
        check(vec![Complex64::new(1., 2.), Complex64::new(-3., 4.)]);
    }

    #[test]
    fn rank0_and_empty() {
        let s = Array::from_ndarray(ndarray::arr0(7u32));
        assert_eq!(s.shape(), &[] as &[usize]);
        assert_eq!(s.view::<u32>().unwrap()[IxDyn(&[])], 7);

        let e = Array::from_ndarray(ArrayD::<f32>::zeros(IxDyn(&[0, 5])));
        assert_eq!(e.shape(), &[0, 5]);
        assert!(e.is_empty());
        assert_eq!(e.view::<f32>().unwrap().shape(), &[0, 5]);
        assert_eq!(e.to_ndarray::<f32>().unwrap().shape(), &[0, 5]);

        // An empty slice of a non-empty array.
        let a = Array1::<i16>::from_vec(vec![1, 2, 3]).slice_axis_move(Axis(0), Slice::from(3..));
        let e = Array::from_ndarray(a);
        assert_eq!(e.shape(), &[0]);
        assert!(e.is_empty());
    }

    #[test]
    fn view_errors() {
        let a = Array::from_ndarray(Array1::from_vec(vec![1.0f32, 2.0]));
        assert_eq!(
            a.view::<f64>().unwrap_err(),
            TreeError::WrongDType {
                expected: DType::F64,
                found: DType::F32
            }
        );
        assert!(a.to_ndarray_bool().is_err());

        let raw = bytes::Bytes::from(vec![0u8; 17]);
        let mis = Array::new(DType::F64, [2], raw.slice(1..17)).unwrap();
        if !mis.is_aligned_to(8) {
            assert!(matches!(
                mis.view::<f64>(),
                Err(TreeError::Misaligned { .. })
            ));
        }
        assert_eq!(
            mis.to_ndarray::<f64>().unwrap().as_slice().unwrap(),
            &[0.0, 0.0]
        );

        // Representable here, refused by ndarray.
        let huge = Array::new(DType::U8, [usize::MAX, 0], bytes::Bytes::new()).unwrap();
        assert_eq!(huge.view::<u8>().unwrap_err(), TreeError::SizeOverflow);
        assert_eq!(
            huge.to_ndarray::<u8>().unwrap_err(),
            TreeError::SizeOverflow
        );
    }

    #[test]
    fn bools_both_ways() {
        let a = Array2::from_shape_vec((2, 2), vec![true, false, false, true]).unwrap();
        let array = Array::from(a.clone());
        assert_eq!(array.dtype(), DType::Bool);
        assert_eq!(array.data().as_ref(), &[1, 0, 0, 1]);
        let back = array.to_ndarray_bool().unwrap();
        assert_eq!(back, a.into_dyn());
        assert!(array.to_ndarray::<u8>().is_err());
        let t = Array::from_ndarray_bool(&back.t());
        assert_eq!(t.data().as_ref(), &[1, 0, 0, 1]);
    }

    #[test]
    fn trees_from_ndarray() {
        let t = tree!({
            "obs": (Array3::<f32>::zeros((2, 3, 4))),
            "mask": (Array1::from_vec(vec![true, false])),
        });
        let obs = t.get("obs").unwrap().as_array().unwrap();
        assert_eq!(obs.shape(), &[2, 3, 4]);
        let view = obs.view::<f32>().unwrap();
        assert_eq!(view.len_of(Axis(2)), 4);
        assert_eq!(
            t.get("mask")
                .unwrap()
                .as_array()
                .unwrap()
                .to_bools()
                .unwrap(),
            vec![true, false]
        );
    }
}
