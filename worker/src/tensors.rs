//! Tensors between safetensors files and libtorch: the dtype mapping both
//! ways, and tensors built from bytes whose length is checked first
//! (libtorch copies what the shape says, whatever the buffer holds).

use safetensors::Dtype;
use tch::{Kind, Tensor};

/// The libtorch kind of a safetensors dtype (None: not one libtorch has).
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// The safetensors dtype of a libtorch kind (None: not storable).
pub fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// A tensor of `shape` and `kind` from `bytes`, refused unless the bytes
/// are exactly what the shape needs.
pub fn from_bytes(bytes: &[u8], shape: &[i64], kind: Kind) -> Result<Tensor, String> {
    let numel = shape.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    });
    let want = numel.and_then(|n| n.checked_mul(kind.elt_size_in_bytes()));
    if want != Some(bytes.len()) {
        return Err(format!(
            "{} bytes do not make a {kind:?} tensor of shape {shape:?}",
            bytes.len()
        ));
    }
    Tensor::f_from_data_size(bytes, shape, kind).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_maps_both_ways_and_lengths_are_checked() {
        for kind in [
            Kind::Float,
            Kind::Double,
            Kind::Half,
            Kind::BFloat16,
            Kind::Int64,
            Kind::Int,
            Kind::Int16,
            Kind::Int8,
            Kind::Uint8,
            Kind::Bool,
        ] {
            assert_eq!(dtype_of(kind).and_then(kind_of), Some(kind));
        }
        let t = from_bytes(&[1, 0, 2, 0], &[2], Kind::Int16).unwrap();
        assert_eq!(Vec::<i16>::try_from(&t).unwrap(), [1, 2]);
        let e = from_bytes(&[1, 0, 2], &[2], Kind::Int16).unwrap_err();
        assert_eq!(e, "3 bytes do not make a Int16 tensor of shape [2]");
        assert!(from_bytes(&[], &[-1], Kind::Uint8).is_err());
    }
}
