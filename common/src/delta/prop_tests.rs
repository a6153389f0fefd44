//! Property tests of the delta codecs on random models: documented error bounds, f32
//! exactness, stream reading in 1-7 byte pieces, corruption and truncation always refused.

use proptest::prelude::*;

use super::test_util::{
    assert_q8_within_bound, bits, decode_vec, encode_vec, f16_within_bound, model, Trickle,
};
use super::*;

/// Any finite f32, both signs, subnormals and zeros included.
fn finite() -> impl Strategy<Value = f32> + Clone {
    use proptest::num::f32::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
}

/// Finite values that fit f16, weighted towards delta-like magnitudes.
fn f16_range() -> impl Strategy<Value = f32> + Clone {
    prop_oneof![
        -65504f32..=65504f32,
        -1f32..1f32,
        -1e-3f32..1e-3f32,
        -1e-5f32..1e-5f32,
        finite().prop_filter("fits f16", |v| v.abs() <= 65504.0),
    ]
}

/// 1 to 4 tensors of rank 0 to 3, up to 23 per dimension, values from `value`.
fn arb_model(value: impl Strategy<Value = f32> + Clone) -> impl Strategy<Value = ModelState> {
    prop::collection::vec(prop::collection::vec(0usize..24, 0..4), 1..5)
        .prop_flat_map(move |shapes| {
            shapes
                .into_iter()
                .map(|shape| {
                    let n: usize = shape.iter().product();
                    (Just(shape), prop::collection::vec(value.clone(), n))
                })
                .collect::<Vec<_>>()
        })
        .prop_map(|tensors| {
            let names: Vec<String> = (0..tensors.len()).map(|i| format!("layer{i}.w")).collect();
            let tensors: Vec<(&str, &[usize], Vec<f32>)> = tensors
                .iter()
                .zip(&names)
                .map(|((shape, data), name)| (name.as_str(), shape.as_slice(), data.clone()))
                .collect();
            model(&tensors)
        })
}

fn arb_codec() -> impl Strategy<Value = Codec> {
    prop_oneof![
        Just(Codec::F32),
        Just(Codec::F16),
        (1u32..=300).prop_map(|block| Codec::Q8 { block }),
    ]
}

/// A model whose values suit `codec`: f16 gets values inside its range.
fn model_for(codec: Codec) -> BoxedStrategy<ModelState> {
    match codec {
        Codec::F16 => arb_model(f16_range()).boxed(),
        Codec::F32 | Codec::Q8 { .. } => arb_model(finite()).boxed(),
    }
}

fn codec_and_model() -> impl Strategy<Value = (Codec, ModelState)> {
    arb_codec().prop_flat_map(|codec| (Just(codec), model_for(codec)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn f32_round_trip_is_exact(m in arb_model(finite())) {
        let back = decode_vec(&encode_vec(&m, Codec::F32), &m, Some(Codec::F32)).unwrap();
        prop_assert_eq!(bits(&back), bits(&m));
    }

    #[test]
    fn f16_round_trip_is_within_bound(m in arb_model(f16_range())) {
        let back = decode_vec(&encode_vec(&m, Codec::F16), &m, Some(Codec::F16)).unwrap();
        for ((_, t), (_, d)) in m.iter().zip(back.iter()) {
            for (&v, &dv) in t.data().iter().zip(d.data()) {
                prop_assert!(f16_within_bound(v, dv), "{} decoded as {}", v, dv);
            }
        }
    }

    #[test]
    fn q8_round_trip_is_within_bound(m in arb_model(finite()), block in 1u32..=300) {
        let codec = Codec::Q8 { block };
        let back = decode_vec(&encode_vec(&m, codec), &m, Some(codec)).unwrap();
        assert_q8_within_bound(&m, &back, block as usize);
    }

    #[test]
    fn trickled_decode_equals_roundtrip((codec, m) in codec_and_model(), step in 0usize..7) {
        let bytes = encode_vec(&m, codec);
        prop_assert_eq!(bytes.len() as u64, encoded_len(&Layout::of(&m), codec));
        let slow = decode_to_model(Trickle { data: &bytes, step }, &Layout::of(&m), Some(codec)).unwrap();
        prop_assert_eq!(bits(&slow), bits(&roundtrip(codec, &m).unwrap()));
    }

    #[test]
    fn any_corrupted_byte_is_refused(
        (codec, m) in codec_and_model(),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let mut bytes = encode_vec(&m, codec);
        let i = at.index(bytes.len());
        bytes[i] ^= flip;
        prop_assert!(decode_vec(&bytes, &m, None).is_err());
    }

    #[test]
    fn any_truncation_is_reported_as_such(
        (codec, m) in codec_and_model(),
        at in any::<prop::sample::Index>(),
    ) {
        let bytes = encode_vec(&m, codec);
        let cut = at.index(bytes.len());
        let e = decode_vec(&bytes[..cut], &m, None).unwrap_err();
        prop_assert!(
            matches!(e, DeltaError::Truncated { got, .. } if got == cut as u64),
            "{}", e
        );
    }
}
