//! File-backed memory mappings through the PROCMAP_QUERY ioctl on `/proc/<pid>/maps` (Linux 6.11+): the kernel
//! answers VMA by VMA with device and inode numbers and formats no text, which makes the mapping check several
//! times cheaper than reading `maps`. Names are fetched only for mappings the caller wants.

use super::procfs_parse::MapEntry;
use std::fs::File;
use std::os::fd::AsRawFd;

/// `struct procmap_query` from <linux/fs.h>.
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

const VMA_WRITABLE: u64 = 0x02;
const VMA_SHARED: u64 = 0x08;
const COVERING_OR_NEXT_VMA: u64 = 0x10;
const FILE_BACKED_VMA: u64 = 0x20;
/// Mappings looked at per process before giving up (a corrupt answer must not loop forever).
const MAX_VMAS: usize = 1 << 20;

nix::ioctl_readwrite!(procmap_query, b'f', 17, ProcmapQuery);

/// The kernel does not know PROCMAP_QUERY: read the maps text instead.
#[derive(Debug)]
pub struct Unsupported;

/// File-backed mappings whose device `wanted(major, minor)` accepts, with their names. A process that exits
/// mid-query yields what was found so far.
pub fn file_mappings(maps: &File, wanted: impl Fn(u32, u32) -> bool) -> Result<Vec<MapEntry>, Unsupported> {
    let mut found = Vec::new();
    let mut addr = 0u64;
    for _ in 0..MAX_VMAS {
        let mut q = ProcmapQuery {
            size: std::mem::size_of::<ProcmapQuery>() as u64,
            query_flags: COVERING_OR_NEXT_VMA | FILE_BACKED_VMA,
            query_addr: addr,
            ..ProcmapQuery::default()
        };
        // SAFETY: q is a valid procmap_query with no name or build-id buffers.
        match unsafe { procmap_query(maps.as_raw_fd(), &mut q) } {
            Ok(_) => {}
            Err(nix::errno::Errno::ENOTTY | nix::errno::Errno::EINVAL) if addr == 0 => return Err(Unsupported),
            // ENOENT: no mapping at or after addr. Anything else: the process went away.
            Err(_) => break,
        }
        if q.vma_end <= addr {
            break;
        }
        if wanted(q.dev_major, q.dev_minor) {
            found.push(MapEntry {
                major: q.dev_major,
                minor: q.dev_minor,
                inode: q.inode,
                shared_writable: q.vma_flags & VMA_WRITABLE != 0 && q.vma_flags & VMA_SHARED != 0,
                path: name_of(maps, q.vma_start).unwrap_or_default(),
            });
        }
        addr = q.vma_end;
    }
    Ok(found)
}

/// The file name of the mapping that starts at `start`.
fn name_of(maps: &File, start: u64) -> Option<String> {
    let mut name = vec![0u8; 4096];
    let mut q = ProcmapQuery {
        size: std::mem::size_of::<ProcmapQuery>() as u64,
        query_flags: FILE_BACKED_VMA,
        query_addr: start,
        vma_name_size: name.len() as u32,
        vma_name_addr: name.as_mut_ptr() as u64,
        ..ProcmapQuery::default()
    };
    // SAFETY: vma_name_addr points at a buffer of vma_name_size bytes that outlives the call.
    unsafe { procmap_query(maps.as_raw_fd(), &mut q) }.ok()?;
    let len = (q.vma_name_size as usize).min(name.len());
    let text = &name[..len];
    let text = text.strip_suffix(&[0]).unwrap_or(text);
    Some(String::from_utf8_lossy(text).into_owned())
}
