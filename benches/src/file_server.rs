//! Benchmark 8: what the in-process FUSE passthrough server behind virtio-fs costs. Through the
//! virtio-fs device with a synthetic driver (GETATTR per-request cost, 128 KiB READ and WRITE
//! throughput against plain pread/pwrite of the same bytes), and through the host kernel's own
//! FUSE client on a `/dev/fuse` mount (a 64 MiB file written then read, 1000 small files
//! created, stat'ed and unlinked, against the same in the host directory directly).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{ensure, Context};
use vmm::fuse::MAX_WRITE;

use crate::context::{workspace_describe, BenchContext};
use crate::fuse_mount::FuseMount;
use crate::interleave::{run_interleaved, Sample, Variant};
use crate::results::BenchResult;
use crate::virtio_fs_driver::{FsDriver, ROOT_NODE};

/// The variant names (the report's ratio table and findings look them up).
pub const DEV_GETATTR: &str = "virtio-fs device + server: GETATTR of the root";
pub const HOST_FSTATAT: &str = "host fstatat of the root (no server)";
pub const DEV_READ: &str = "virtio-fs device + server: READ 128 KiB";
pub const HOST_PREAD: &str = "host pread 128 KiB (no server)";
pub const DEV_WRITE: &str = "virtio-fs device + server: WRITE 128 KiB";
pub const HOST_PWRITE: &str = "host pwrite 128 KiB (no server)";
pub const MOUNT_SEQ: &str = "FUSE mount (host kernel client): 64 MiB file";
pub const DIRECT_SEQ: &str = "host directory directly: 64 MiB file";
pub const MOUNT_FILES: &str = "FUSE mount (host kernel client): 1000 small files";
pub const DIRECT_FILES: &str = "host directory directly: 1000 small files";

/// (what, variant, baseline, metric, higher is better) for the report's ratio table.
pub const COMPARISONS: [(&str, &str, &str, &str, bool); 6] = [
    (
        "GETATTR, device + server vs fstatat",
        DEV_GETATTR,
        HOST_FSTATAT,
        "us_per_request",
        false,
    ),
    (
        "READ 128 KiB, device + server vs pread",
        DEV_READ,
        HOST_PREAD,
        "throughput",
        true,
    ),
    (
        "WRITE 128 KiB, device + server vs pwrite",
        DEV_WRITE,
        HOST_PWRITE,
        "throughput",
        true,
    ),
    (
        "sequential write 64 MiB, mount vs direct",
        MOUNT_SEQ,
        DIRECT_SEQ,
        "write_throughput",
        true,
    ),
    (
        "sequential read 64 MiB, mount vs direct",
        MOUNT_SEQ,
        DIRECT_SEQ,
        "read_throughput",
        true,
    ),
    (
        "create + stat + unlink, mount vs direct",
        MOUNT_FILES,
        DIRECT_FILES,
        "ops_per_s",
        true,
    ),
];

const FILE_BYTES: usize = 64 << 20;
const CHUNK: usize = MAX_WRITE as usize;
const GETATTRS: usize = 2000;
/// The buffer of each read(2)/write(2) on the mount and the host directory.
const IO_BUFFER: usize = 1 << 20;
const SMALL_FILES: usize = 1000;
const SMALL_FILE_BYTES: usize = 64;

fn mb_per_s(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 / 1e6 / seconds
}

fn unit_of(metric: &str) -> &'static str {
    match metric {
        "requests_per_s" => "requests/s",
        "ops_per_s" => "ops/s",
        m if m.ends_with("throughput") => "MB/s",
        m if m.starts_with("server_") => "requests",
        _ => "µs",
    }
}

/// `count` calls of `one`, as µs per call and calls per second.
fn per_request(
    count: usize,
    mut one: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Sample> {
    let t = Instant::now();
    for _ in 0..count {
        one()?;
    }
    let s = t.elapsed().as_secs_f64();
    Ok(vec![
        ("us_per_request", s * 1e6 / count as f64),
        ("requests_per_s", count as f64 / s),
    ])
}

/// The whole file in CHUNK-sized calls of `one(offset)` (which returns the bytes moved).
fn whole_file(mut one: impl FnMut(u64) -> anyhow::Result<usize>) -> anyhow::Result<Sample> {
    let t = Instant::now();
    for i in 0..FILE_BYTES / CHUNK {
        let n = one((i * CHUNK) as u64)?;
        ensure!(n == CHUNK, "{n} of {CHUNK} bytes at chunk {i}");
    }
    let s = t.elapsed().as_secs_f64();
    Ok(vec![
        ("throughput", mb_per_s(FILE_BYTES, s)),
        ("us_per_request", s * 1e6 / (FILE_BYTES / CHUNK) as f64),
    ])
}

fn fstatat_empty_path(fd: i32) -> anyhow::Result<()> {
    // SAFETY: an all-zero stat is a valid value for the kernel to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let flags = libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW;
    // SAFETY: a NUL-terminated empty path and a stat buffer that live for the call.
    let rc = unsafe { libc::fstatat(fd, c"".as_ptr(), &mut st, flags) };
    ensure!(rc == 0, "fstatat: {}", std::io::Error::last_os_error());
    Ok(())
}

/// A 64 MiB file of a byte pattern.
fn make_file(path: &Path) -> anyhow::Result<()> {
    let chunk: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    for _ in 0..FILE_BYTES / CHUNK {
        f.write_all(&chunk)?;
    }
    Ok(())
}

/// Writes `path` sequentially (overwriting in place), closes it, opens it again and reads it.
fn sequential(path: &Path, buf: &mut [u8], mount: Option<&FuseMount>) -> anyhow::Result<Sample> {
    let served = |m: &FuseMount| {
        let s = m.served();
        (
            s.reads.load(Ordering::Relaxed),
            s.writes.load(Ordering::Relaxed),
        )
    };
    let before = mount.map(served);
    let t = Instant::now();
    // Overwritten in place: no block allocation after the first round, in both variants.
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    for _ in 0..FILE_BYTES / buf.len() {
        f.write_all(buf)?;
    }
    drop(f);
    let write_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    // A new open: the FUSE client drops the inode's cached pages (the server's OPEN reply has
    // no FOPEN_KEEP_CACHE), so the read goes to the server; the counters below show it.
    let mut f = File::open(path)?;
    let mut total = 0;
    loop {
        let n = f.read(buf)?;
        if n == 0 {
            break;
        }
        total += n;
    }
    drop(f);
    let read_s = t.elapsed().as_secs_f64();
    ensure!(total == FILE_BYTES, "read {total} of {FILE_BYTES} bytes");
    let mut sample = vec![
        ("write_throughput", mb_per_s(FILE_BYTES, write_s)),
        ("read_throughput", mb_per_s(FILE_BYTES, read_s)),
    ];
    if let (Some(m), Some((r0, w0))) = (mount, before) {
        let (r1, w1) = served(m);
        sample.push(("server_read_requests", (r1 - r0) as f64));
        sample.push(("server_write_requests", (w1 - w0) as f64));
    }
    Ok(sample)
}

/// Creates (with SMALL_FILE_BYTES of data), stats and unlinks each of `names`, phase by phase.
fn small_files(names: &[PathBuf]) -> anyhow::Result<Sample> {
    let data = [7u8; SMALL_FILE_BYTES];
    let t = Instant::now();
    for n in names {
        File::create(n)?.write_all(&data)?;
    }
    let create = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for n in names {
        ensure!(
            fs::metadata(n)?.len() == SMALL_FILE_BYTES as u64,
            "size of {}",
            n.display()
        );
    }
    let stat = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for n in names {
        fs::remove_file(n)?;
    }
    let unlink = t.elapsed().as_secs_f64();
    let per_file = |s: f64| s * 1e6 / names.len() as f64;
    Ok(vec![
        (
            "ops_per_s",
            3.0 * names.len() as f64 / (create + stat + unlink),
        ),
        ("create_us", per_file(create)),
        ("stat_us", per_file(stat)),
        ("unlink_us", per_file(unlink)),
    ])
}

fn small_file_names(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let dir = dir.join("small");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok((0..SMALL_FILES)
        .map(|i| dir.join(format!("f{i:04}")))
        .collect())
}

pub fn run(ctx: &BenchContext) -> anyhow::Result<BenchResult> {
    let share = ctx.work_dir.join("fs-share");
    let mounted_share = ctx.work_dir.join("fs-mounted-share");
    let mount_point = ctx.work_dir.join("fs-mount");
    let direct = ctx.work_dir.join("fs-direct");
    for d in [&share, &mounted_share, &mount_point, &direct] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    make_file(&share.join("read.dat"))?;
    make_file(&share.join("write.dat"))?;

    let mut getattr_dev = FsDriver::new(&share)?;
    let mut read_dev = FsDriver::new(&share)?;
    let read_fh = {
        let node = read_dev.lookup("read.dat")?;
        read_dev.open(node, libc::O_RDONLY)?
    };
    let mut write_dev = FsDriver::new(&share)?;
    write_dev.fill_write_pages(0x5a)?;
    let write_fh = {
        let node = write_dev.lookup("write.dat")?;
        write_dev.open(node, libc::O_WRONLY)?
    };
    // The device's WRITE reaches the host file (it holds the pattern until then).
    write_dev.write(write_fh, 0, CHUNK)?;
    let mut head = [0u8; 4096];
    File::open(share.join("write.dat"))?.read_exact(&mut head)?;
    ensure!(
        head.iter().all(|&b| b == 0x5a),
        "a WRITE did not reach write.dat"
    );
    let root = File::open(&share)?;
    let host_read = File::open(share.join("read.dat"))?;
    let host_write = OpenOptions::new()
        .write(true)
        .open(share.join("write.dat"))?;
    let mut read_buf = vec![0u8; CHUNK];
    let write_buf = vec![0x5au8; CHUNK];

    let mut notes = vec![
        format!(
            "Device + server: vmm's FsDevice over a FuseServer of a host directory (on the \
             file system of {}), driven by a synthetic driver in this process (no guest \
             kernel): each request is posted on the request queue in guest memory the way \
             Linux's virtio-fs driver lays it out (the 40-byte fuse_in_header and the \
             arguments in their own descriptors, file data in 4 KiB page descriptors; the \
             reply's 16-byte header, then its body or data pages), one request per \
             notification, served on the calling thread; the device signals the used ring \
             through its interrupt eventfd each time. INIT (7.31), LOOKUP and OPEN once before \
             the run.",
            ctx.work_dir.display()
        ),
        format!(
            "GETATTR: {GETATTRS} requests of the root per sample (us_per_request, \
             requests_per_s); the baseline is the server's own host call for it, \
             fstatat(fd, \"\", AT_EMPTY_PATH), on the same directory. READ / WRITE: a 64 MiB \
             file read or overwritten in place in {} KiB requests ({} per sample); the \
             baselines pread / pwrite the same bytes of the same file at the same offsets from \
             one buffer. Every read is served from the host page cache (the files were just \
             written) and no write is synced, so the ratio is the cost of the device and the \
             server (copies through guest memory, chain handling, the FUSE protocol), not of \
             storage.",
            CHUNK >> 10,
            FILE_BYTES / CHUNK
        ),
    ];

    let mount = match FuseMount::new(&mounted_share, &mount_point) {
        Ok(m) => Some(m),
        Err(e) => {
            notes.push(format!(
                "FUSE mount through /dev/fuse: not measurable here: {e:#}"
            ));
            None
        }
    };
    let mut seq_buf = vec![0x33u8; IO_BUFFER];
    let mut direct_buf = vec![0x33u8; IO_BUFFER];
    let (mount_seq, direct_seq) = (mount_point.join("seq.dat"), direct.join("seq.dat"));
    let mount_names = small_file_names(&mount_point)?;
    let direct_names = small_file_names(&direct)?;

    let mut variants = vec![
        Variant::new(DEV_GETATTR, "", || {
            per_request(GETATTRS, || getattr_dev.getattr(ROOT_NODE))
        }),
        Variant::new(HOST_FSTATAT, "", || {
            per_request(GETATTRS, || fstatat_empty_path(root.as_raw_fd()))
        }),
        Variant::new(DEV_READ, "", || {
            whole_file(|off| read_dev.read(read_fh, off, CHUNK))
        }),
        Variant::new(HOST_PREAD, "", || {
            whole_file(|off| Ok(host_read.read_at(&mut read_buf, off)?))
        }),
        Variant::new(DEV_WRITE, "", || {
            whole_file(|off| write_dev.write(write_fh, off, CHUNK))
        }),
        Variant::new(HOST_PWRITE, "", || {
            whole_file(|off| Ok(host_write.write_at(&write_buf, off)?))
        }),
    ];
    if let Some(m) = &mount {
        variants.push(Variant::new(MOUNT_SEQ, "", || {
            sequential(&mount_seq, &mut seq_buf, Some(m))
        }));
        variants.push(Variant::new(DIRECT_SEQ, "", || {
            sequential(&direct_seq, &mut direct_buf, None)
        }));
        variants.push(Variant::new(MOUNT_FILES, "", || small_files(&mount_names)));
        variants.push(Variant::new(DIRECT_FILES, "", || {
            small_files(&direct_names)
        }));
        notes.push(format!(
            "FUSE mount: the same server (its own instance, on another directory) behind the \
             host kernel's FUSE client, mounted through /dev/fuse and served by one thread (one \
             request per read(2), one reply per write(2)); the harness uses ordinary file \
             calls on the mount point, the baseline the same calls on a directory of the same \
             host file system. 64 MiB file: written with {} KiB write(2) calls (overwritten in \
             place after the first round), closed, opened again and read with {} KiB read(2) \
             calls; open and close are in the times. The FUSE client here writes through (no \
             writeback cache is negotiated) and drops its cached pages on each open (the \
             server does not set FOPEN_KEEP_CACHE), so the mount's read goes to the server: \
             server_read_requests counts the READ requests it answered per run. The direct \
             read comes from the host page cache, and so do the server's preads behind the \
             mount. No O_DIRECT and no sync: what is compared is the data path, not storage.",
            IO_BUFFER >> 10,
            IO_BUFFER >> 10
        ));
        notes.push(format!(
            "Small files: {SMALL_FILES} files of {SMALL_FILE_BYTES} bytes each created \
             (open O_CREAT|O_TRUNC, write, close), then each stat'ed, then each unlinked; \
             ops_per_s = {} operations / total time, create_us / stat_us / unlink_us per file. \
             Through the mount, stat may be answered from the kernel's attribute cache (the \
             server grants 1 s). create_us includes the host file system's inode allocation \
             in both variants (on ext4 it grows when inodes were freed recently, as every \
             round does), so stat_us and unlink_us show the FUSE round trip more clearly.",
            3 * SMALL_FILES
        ));
    }
    eprintln!(
        "fs: {} warm-up + {} runs, {} variants",
        ctx.warmup,
        ctx.runs,
        variants.len()
    );
    let (mut series, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    drop(mount);
    for s in &mut series {
        s.unit = unit_of(&s.metric).into();
    }
    let mut result = BenchResult::measured(
        ctx,
        "fs",
        "virtio-fs file server: device + FUSE server vs direct host I/O",
        series,
        outcomes,
        notes,
    );
    result.under_test = format!(
        "the vmm crate's FsDevice and FuseServer as compiled into this bench-report \
         (workspace at {} when run); the host kernel's FUSE client",
        workspace_describe()
    );
    Ok(result)
}
