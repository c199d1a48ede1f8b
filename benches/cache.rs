//! Block cache throughput: sealing and opening a 1 MiB block, BlockCache get/put of 1 MiB
//! blocks in a temp dir, and a random 4 KiB read of a cached 1 MiB block, by its units
//! (`get_range`) and whole (`get`). Run: `cargo bench --bench cache`.

use std::hint::black_box;

use autosync::cache::{BlockCache, BlockId, CacheKey, Sealer, sealed_len};
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
        BlockCache::open(dir.path(), &CacheKey::from_bytes([7; 32]), 256 * sealed_len(MIB) as u64).expect("open cache");
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

    // A 4 KiB read at a random 4 KiB offset of one of the 64 blocks (in the page cache, as
    // after the first reads of a mount): by the one unit that holds it, or the whole block.
    let mut g = c.benchmark_group("read 4 KiB of a 1 MiB block");
    g.throughput(Throughput::Bytes(4096));
    let mut x = 1u64;
    let mut pick = move || {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (10_000 + (x >> 33) % 64, (x >> 13) % (MIB as u64 / 4096) * 4096)
    };
    g.bench_function("get_range (one 64 KiB unit)", |b| {
        b.iter(|| {
            let (i, off) = pick();
            let got = cache.get_range(&id(i), off..off + 4096, MIB as u64).expect("hit");
            assert_eq!(got.len(), 4096);
            got
        })
    });
    g.bench_function("get (the whole block), then slice", |b| {
        b.iter(|| {
            let (i, off) = pick();
            cache.get(&id(i)).expect("hit").slice(off as usize..off as usize + 4096)
        })
    });
    g.finish();
    let s = cache.stats();
    assert_eq!(s.integrity_failures, 0);
    assert!(s.bytes <= s.capacity);
}

criterion_group!(benches, seal_open, cache_get_put);
criterion_main!(benches);
