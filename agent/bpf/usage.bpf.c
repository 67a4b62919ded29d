// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * The agent's in-kernel usage scan: three iterators over every task visible in the reader's pid namespace that
 * write one record per use of a watched device, filtering in the kernel (printing everything and filtering in
 * userspace doubles the cost). The agent writes the device numbers of one scan into `devices` and reads the three
 * iterators; what it gets is the set of processes to look at through /proc, where names, paths and access modes
 * come from as they do for the /proc scanner.
 *
 * A file is on a watched device when its inode's superblock is one (s_dev: a filesystem's own number, an overlay's
 * or btrfs' anonymous one; s_bdev: the block device under it), or when it is a block-device node of one (i_rdev).
 * Device numbers are the kernel's encoding, major << 20 | minor, not userspace's.
 *
 * GPL: iterators are tracing programs, and the helpers they need (bpf_seq_write) are GPL-only.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

#define S_IFMT 00170000
#define S_IFBLK 0060000

/* What a record says the process holds; the same numbers as the agent's `bpf::UseKind`. */
enum use_kind {
	USE_FD = 1,
	USE_CWD = 2,
	USE_ROOT = 3,
	USE_EXE = 4,
	USE_MAP = 5,
	/* Not a use: the mount namespace of a process (every thread-group leader), in `dev`. */
	USE_MOUNT_NS = 6,
};

struct record {
	__u32 pid;
	__u32 kind;
	/* The fd for USE_FD, else 0. */
	__u32 fd;
	/* The watched device matched (kernel encoding), or the mount namespace's inode for USE_MOUNT_NS. */
	__u32 dev;
};

/* The watched devices of the running scan (kernel encoding) → 1. Rewritten by the agent before each scan. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} devices SEC(".maps");

/* The depth of the reader's pid namespace (0: the initial one), set at load: pids are reported as the reader's
 * /proc names them. */
const volatile __u32 pid_level = 0;

static __always_inline bool watched(__u32 dev)
{
	return dev && bpf_map_lookup_elem(&devices, &dev);
}

/* The watched device an inode is on, or 0. */
static __always_inline __u32 inode_device(struct inode *inode)
{
	if (!inode)
		return 0;
	struct super_block *sb = BPF_CORE_READ(inode, i_sb);
	if (sb) {
		__u32 dev = BPF_CORE_READ(sb, s_dev);
		if (watched(dev))
			return dev;
		struct block_device *bdev = BPF_CORE_READ(sb, s_bdev);
		if (bdev) {
			dev = BPF_CORE_READ(bdev, bd_dev);
			if (watched(dev))
				return dev;
		}
	}
	if ((BPF_CORE_READ(inode, i_mode) & S_IFMT) == S_IFBLK) {
		__u32 rdev = BPF_CORE_READ(inode, i_rdev);
		if (watched(rdev))
			return rdev;
	}
	return 0;
}

static __always_inline __u32 file_device(struct file *file)
{
	return file ? inode_device(BPF_CORE_READ(file, f_inode)) : 0;
}

static __always_inline __u32 path_device(struct dentry *dentry)
{
	return dentry ? inode_device(BPF_CORE_READ(dentry, d_inode)) : 0;
}

/* The process's pid as the reader's /proc names it. */
static __always_inline __u32 process_id(struct task_struct *task)
{
	__u32 level = pid_level;
	if (level == 0)
		return BPF_CORE_READ(task, tgid);
	if (level > 31)
		return 0;
	struct pid *pid = BPF_CORE_READ(task, group_leader, thread_pid);
	int nr = 0;
	if (pid)
		bpf_core_read(&nr, sizeof(nr), &pid->numbers[level].nr);
	return nr;
}

static __always_inline void emit(struct seq_file *seq, struct task_struct *task, __u32 kind, __u32 fd, __u32 dev)
{
	struct record r = { .pid = process_id(task), .kind = kind, .fd = fd, .dev = dev };
	bpf_seq_write(seq, &r, sizeof(r));
}

/* Open files: the kernel visits each files table once (threads that share their leader's are skipped). */
SEC("iter/task_file")
int usage_files(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	if (!task || !file)
		return 0;
	__u32 dev = file_device(file);
	if (dev)
		emit(ctx->meta->seq, task, USE_FD, ctx->fd, dev);
	return 0;
}

/* Working directory, root and executable, and the mount namespace, of each thread-group leader (threads share
 * them, or their differences are the leader's process to /proc as well). */
SEC("iter/task")
int usage_tasks(struct bpf_iter__task *ctx)
{
	struct task_struct *task = ctx->task;
	if (!task || BPF_CORE_READ(task, pid) != BPF_CORE_READ(task, tgid))
		return 0;
	struct seq_file *seq = ctx->meta->seq;
	struct nsproxy *nsproxy = BPF_CORE_READ(task, nsproxy);
	if (nsproxy)
		emit(seq, task, USE_MOUNT_NS, 0, BPF_CORE_READ(nsproxy, mnt_ns, ns.inum));
	struct fs_struct *fs = BPF_CORE_READ(task, fs);
	if (fs) {
		__u32 dev = path_device(BPF_CORE_READ(fs, pwd.dentry));
		if (dev)
			emit(seq, task, USE_CWD, 0, dev);
		dev = path_device(BPF_CORE_READ(fs, root.dentry));
		if (dev)
			emit(seq, task, USE_ROOT, 0, dev);
	}
	struct mm_struct *mm = BPF_CORE_READ(task, mm);
	if (mm) {
		__u32 dev = file_device(BPF_CORE_READ(mm, exe_file));
		if (dev)
			emit(seq, task, USE_EXE, 0, dev);
	}
	return 0;
}

/* File mappings (Linux 5.12+). */
SEC("iter/task_vma")
int usage_mappings(struct bpf_iter__task_vma *ctx)
{
	struct task_struct *task = ctx->task;
	struct vm_area_struct *vma = ctx->vma;
	if (!task || !vma)
		return 0;
	__u32 dev = file_device(BPF_CORE_READ(vma, vm_file));
	if (dev)
		emit(ctx->meta->seq, task, USE_MAP, 0, dev);
	return 0;
}
