//! Loader determinism: batches are a pure function of (seed, epoch, batch index).

use std::sync::Arc;

use rdrop_data::{Augment, Loader, LoaderConfig, Split, TrainTransform};

fn split() -> Arc<Split> {
    Arc::new(Split::random(70, 10, 3))
}

fn cfg(threads: usize) -> LoaderConfig {
    LoaderConfig {
        threads: Some(threads),
        prefetch: 2,
        ..LoaderConfig::train(24, 8, 42)
    }
}

#[test]
fn identical_bytes_with_1_and_4_threads() {
    let a: Vec<_> = Loader::new(split(), cfg(1))
        .unwrap()
        .epoch(1, 0)
        .map(Result::unwrap)
        .collect();
    let b: Vec<_> = Loader::new(split(), cfg(4))
        .unwrap()
        .epoch(1, 0)
        .map(Result::unwrap)
        .collect();
    assert_eq!(a.len(), 8); // 70 / 8, drop_last
    for (x, y) in a.iter().zip(&b) {
        let bx: Vec<u32> = x.images.iter().map(|v| v.to_bits()).collect();
        let by: Vec<u32> = y.images.iter().map(|v| v.to_bits()).collect();
        assert_eq!(bx, by);
        assert_eq!(x.labels, y.labels);
    }
}

#[test]
fn mid_epoch_resume_gives_the_same_batches() {
    let l = Loader::new(split(), cfg(2)).unwrap();
    let full: Vec<_> = l.epoch(3, 0).map(Result::unwrap).collect();
    let resumed: Vec<_> = Loader::new(split(), cfg(3))
        .unwrap()
        .epoch(3, 5)
        .map(Result::unwrap)
        .collect();
    assert_eq!(resumed.len(), 3);
    assert_eq!(&full[5..], &resumed[..]);
    assert_eq!(resumed[0].index, 5);
    assert_eq!(l.batch(3, 6).unwrap(), full[6]);
}

#[test]
fn epochs_and_seeds_differ_and_cover_without_repeats() {
    let l = Loader::new(split(), cfg(2)).unwrap();
    let e0: Vec<u32> = l.epoch(0, 0).flat_map(|b| b.unwrap().indices).collect();
    let e1: Vec<u32> = l.epoch(1, 0).flat_map(|b| b.unwrap().indices).collect();
    assert_ne!(e0, e1);
    let mut s = e0.clone();
    s.sort();
    s.dedup();
    assert_eq!(s.len(), 64);
    let other = Loader::new(split(), LoaderConfig { seed: 43, ..cfg(2) }).unwrap();
    assert_ne!(
        other.batch(0, 0).unwrap().images,
        l.batch(0, 0).unwrap().images
    );
    // the augmentation is random: the same image twice in different epochs differs
    assert_ne!(l.batch(0, 0).unwrap().images, l.batch(1, 0).unwrap().images);
}

#[test]
fn test_loader_keeps_order_and_every_image() {
    let sp = split();
    let l = Loader::new(sp.clone(), LoaderConfig::test(16, 32)).unwrap();
    assert_eq!(l.batches_per_epoch(), 3);
    let batches: Vec<_> = l.epoch(0, 0).map(Result::unwrap).collect();
    assert_eq!(batches[2].len(), 6);
    let idx: Vec<u32> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(idx, (0..70).collect::<Vec<u32>>());
    let labels: Vec<u32> = batches.iter().flat_map(|b| b.labels.clone()).collect();
    let want: Vec<u32> = sp.fine_labels.iter().map(|&l| l as u32).collect();
    assert_eq!(labels, want);
    // deterministic regardless of epoch (no randomness in the test transform)
    assert_eq!(l.batch(5, 1).unwrap().images, batches[1].images);
}

#[test]
fn values_are_normalised_and_config_is_checked() {
    let l = Loader::new(split(), cfg(1)).unwrap();
    let b = l.batch(0, 0).unwrap();
    assert_eq!(b.images.len(), 8 * 3 * 24 * 24);
    assert!(b.images.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert!(Loader::new(
        split(),
        LoaderConfig {
            batch_size: 0,
            ..cfg(1)
        }
    )
    .is_err());
    assert!(l.batch(0, 8).is_err());
    let c = LoaderConfig {
        augment: Augment::Recipe(TrainTransform {
            hflip: true,
            ..Default::default()
        }),
        ..cfg(1)
    };
    let json = serde_json::to_string(&c).unwrap();
    let back: LoaderConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, c);
}

#[test]
fn recycled_buffers_give_the_same_batches() {
    let l = Loader::new(split(), cfg(2)).unwrap();
    let fresh: Vec<_> = l.epoch(2, 0).map(Result::unwrap).collect();
    let mut again = Vec::new();
    for b in l.epoch(2, 0) {
        let b = b.unwrap();
        again.push(b.clone());
        l.recycle(b);
    }
    assert_eq!(fresh, again);
}

#[test]
fn dropping_an_epoch_midway_stops_the_thread() {
    let l = Loader::new(split(), cfg(1)).unwrap();
    let mut it = l.epoch(0, 0);
    assert!(it.next().unwrap().is_ok());
    drop(it); // must not hang
    assert_eq!(l.epoch(0, 100).count(), 0);
}

#[cfg(feature = "candle")]
#[test]
fn batches_become_tensors() {
    use candle_core::{DType, Device};
    let l = Loader::new(split(), cfg(1)).unwrap();
    let b = l.batch(0, 0).unwrap();
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let (x, y) = b.to_tensors(dt, &Device::Cpu).unwrap();
        assert_eq!(x.dims(), &[8, 3, 24, 24]);
        assert_eq!(x.dtype(), dt);
        assert_eq!(y.dtype(), DType::U32);
        assert_eq!(y.to_vec1::<u32>().unwrap(), b.labels);
    }
    let (x, _) = b.to_tensors(DType::F32, &Device::Cpu).unwrap();
    assert_eq!(x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.images);
}
