//! Block cache throughput: sealing and opening a 1 MiB block, and BlockCache get/put of
//! 1 MiB blocks in a temp dir. Run: `cargo bench --bench cache`.

use std::hint::black_box;

use autosync::cache::{BlockCache, BlockId, CacheKey, Sealer};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const MIB: usize = 1 << 20;

fn id(index: u64) -> BlockId<'static> {
    BlockId { key: "bench/some/object.bin", version: "\"5d41402abc4b2a76b9719d911017c592\"", index }
}

fn data() -> Vec<u8> {
    (0..MIB).map(|i| (i * 31 % 251) as u8).collect()
}

fn seal_open(c: &mut Criterion) {
    let sealer = Sealer::new(&CacheKey::from_bytes([7; 32]));
    let plain = data();
    let sealed = sealer.seal(&id(0), &plain).expect("seal");
    let mut g = c.benchmark_group("seal");
    g.throughput(Throughput::Bytes(MIB as u64));
    g.bench_function("seal 1 MiB", |b| b.iter(|| sealer.seal(black_box(&id(0)), black_box(&plain))));
    g.bench_function("open 1 MiB", |b| {
        b.iter_batched_ref(
            || sealed.clone(),
            |f| sealer.open_in_place(black_box(&id(0)), f).expect("open"),
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn cache_get_put(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    // Room for 256 blocks: puts cycle through 512 indexes, so they evict as they go.
    let cache =
        BlockCache::open(dir.path(), &CacheKey::from_bytes([7; 32]), 256 * (MIB as u64 + 64)).expect("open cache");
    let plain = data();
    let mut g = c.benchmark_group("cache");
    g.throughput(Throughput::Bytes(MIB as u64));
    let mut n = 0u64;
    g.bench_function("put 1 MiB", |b| {
        b.iter(|| {
            n += 1;
            cache.try_put(&id(n % 512), &plain).expect("put");
        })
    });
    for i in 0..64 {
        cache.put(&id(10_000 + i), &plain);
    }
    let mut m = 0u64;
    g.bench_function("get 1 MiB", |b| {
        b.iter(|| {
            m += 1;
            cache.get(&id(10_000 + m % 64)).expect("hit")
        })
    });
    g.finish();
    let s = cache.stats();
    assert_eq!(s.integrity_failures, 0);
    assert!(s.bytes <= s.capacity);
}

criterion_group!(benches, seal_open, cache_get_put);
criterion_main!(benches);
