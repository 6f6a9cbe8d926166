use proptest::prelude::*;

use super::*;

fn name(s: &str) -> TensorName {
    TensorName::new(s).unwrap()
}

#[test]
fn deciles_of_uniform_values_have_ten_equal_bins() {
    let values: Vec<f64> = (0..1000).map(f64::from).collect();
    let reference = ReferenceFeature::from_samples(name("x"), &values).unwrap();
    assert_eq!(
        reference.edges,
        vec![
            100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0, 900.0
        ]
    );
    assert!(
        reference
            .proportions
            .iter()
            .all(|p| (p - 0.1).abs() < 1e-12)
    );
    assert_eq!((reference.min, reference.max), (0.0, 999.0));
    reference.validate().unwrap();
}

#[test]
fn repeated_values_collapse_edges() {
    let values = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0];
    let reference = ReferenceFeature::from_samples(name("flag"), &values).unwrap();
    assert_eq!(reference.edges, vec![1.0]);
    assert_eq!(reference.proportions, vec![0.8, 0.2]);
}

#[test]
fn sketch_counts_nan_and_out_of_range() {
    let reference = ReferenceFeature::from_samples(name("x"), &[0.0, 1.0, 2.0, 3.0]).unwrap();
    let mut sketch = reference.sketch();
    for x in [f64::NAN, -5.0, 0.5, 2.5, 9.0] {
        sketch.observe(&reference, x);
    }
    assert_eq!(sketch.nan, 1);
    assert_eq!(sketch.count, 4);
    assert_eq!(sketch.out_of_range, 2);
    assert_eq!(sketch.bins.iter().sum::<u64>(), 4);
    assert_eq!((sketch.min, sketch.max), (-5.0, 9.0));
}

#[test]
fn histogram_buckets_are_contiguous_and_tight() {
    let mut previous_floor = 0;
    for index in 1..400 {
        let floor = LatencyHistogram::bucket_floor(index);
        assert!(
            floor > previous_floor || floor == u64::MAX,
            "bucket {index}"
        );
        if floor != u64::MAX {
            assert_eq!(LatencyHistogram::bucket_of(floor), index);
            assert_eq!(LatencyHistogram::bucket_of(floor - 1), index - 1);
        }
        previous_floor = floor;
    }
    assert_eq!(
        LatencyHistogram::bucket_of(u64::MAX),
        LatencyHistogram::bucket_of(u64::MAX - 1)
    );
}

#[test]
fn histogram_p95_of_known_latencies() {
    let mut histogram = LatencyHistogram::default();
    for micros in 1..=1000u64 {
        histogram.record(micros * 10);
    }
    let p95 = histogram.quantile(0.95).unwrap();
    assert!((9500..=9500 * 9 / 8 + 1).contains(&p95), "p95 {p95}");
    assert_eq!(LatencyHistogram::default().quantile(0.5), None);
}

proptest! {
    #[test]
    fn bucket_floor_bounds_every_value(micros in any::<u64>()) {
        let bucket = LatencyHistogram::bucket_of(micros);
        prop_assert!(LatencyHistogram::bucket_floor(bucket) <= micros);
        let next = LatencyHistogram::bucket_floor(bucket + 1);
        prop_assert!(next > micros || next == u64::MAX);
    }

    #[test]
    fn histogram_merge_equals_recording_everything(
        a in proptest::collection::vec(0u64..10_000_000, 0..200),
        b in proptest::collection::vec(0u64..10_000_000, 0..200),
    ) {
        let (mut ha, mut hb, mut all) = (LatencyHistogram::default(), LatencyHistogram::default(), LatencyHistogram::default());
        a.iter().for_each(|x| { ha.record(*x); all.record(*x) });
        b.iter().for_each(|x| { hb.record(*x); all.record(*x) });
        ha.merge(&hb);
        prop_assert_eq!(ha, all);
    }

    #[test]
    fn sketch_merge_equals_observing_everything(
        train in proptest::collection::vec(-100.0f64..100.0, 1..300),
        a in proptest::collection::vec(-200.0f64..200.0, 0..200),
        b in proptest::collection::vec(-200.0f64..200.0, 0..200),
    ) {
        let reference = ReferenceFeature::from_samples(name("f"), &train).unwrap();
        reference.validate().unwrap();
        let (mut sa, mut sb, mut all) = (reference.sketch(), reference.sketch(), reference.sketch());
        a.iter().for_each(|x| { sa.observe(&reference, *x); all.observe(&reference, *x) });
        b.iter().for_each(|x| { sb.observe(&reference, *x); all.observe(&reference, *x) });
        sa.merge(&sb).unwrap();
        prop_assert_eq!(&sa.bins, &all.bins);
        prop_assert_eq!((sa.count, sa.nan, sa.out_of_range), (all.count, all.nan, all.out_of_range));
        prop_assert!((sa.sum - all.sum).abs() < 1e-6 * (1.0 + all.sum.abs()));
        prop_assert_eq!((sa.min.to_bits(), sa.max.to_bits()), (all.min.to_bits(), all.max.to_bits()));
    }
}

#[test]
fn an_empty_sketch_survives_json_and_cbor() {
    let empty = FeatureSketch::new(10);
    let json = serde_json::to_string(&empty).unwrap();
    assert!(json.contains(r#""min":null,"max":null"#), "{json}");
    assert_eq!(serde_json::from_str::<FeatureSketch>(&json).unwrap(), empty);
    let cbor = crate::codec::encode(&empty);
    let decoded: FeatureSketch = crate::codec::decode("sketch", &cbor, cbor.len()).unwrap();
    assert_eq!(decoded, empty);
}
