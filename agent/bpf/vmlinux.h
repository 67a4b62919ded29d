/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * The kernel types the usage iterators read, and only the members they read: a CO-RE subset of the full
 * `bpftool btf dump file /sys/kernel/btf/vmlinux format c` (some 150,000 lines for 6.18). Every struct is marked
 * preserve_access_index, so clang records each member access by name and the loader moves it to wherever the
 * running kernel's BTF puts that member: one object runs on the guest's 6.1 and on 6.18. A member is listed here
 * only if it exists under that name in every kernel from 5.12 (the first with iter/task_vma) on, but for the maple
 * tree's, which only the per-process walk (Linux 6.7+) reads: a member a kernel lacks makes the loader poison the
 * instructions that read it, which fails only a program that does.
 */
#ifndef WUKONG_VMLINUX_H
#define WUKONG_VMLINUX_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef __u16 umode_t;
typedef __u32 dev_t;
typedef _Bool bool;

enum {
	false = 0,
	true = 1,
};

enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
};

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct seq_file;

struct block_device {
	dev_t bd_dev;
};

struct super_block {
	dev_t s_dev;
	struct block_device *s_bdev;
};

struct inode {
	umode_t i_mode;
	dev_t i_rdev;
	struct super_block *i_sb;
};

struct dentry {
	struct inode *d_inode;
	struct super_block *d_sb;
};

struct vfsmount;

struct path {
	struct vfsmount *mnt;
	struct dentry *dentry;
};

struct file {
	struct path f_path;
	struct inode *f_inode;
};

struct fs_struct {
	struct path root;
	struct path pwd;
};

/* The maple tree a process's mappings are kept in (Linux 6.1+; read only by the per-process walk, 6.7+). */
struct maple_pnode;

struct maple_tree {
	unsigned int ma_flags;
	void *ma_root;
};

struct maple_range_64 {
	struct maple_pnode *parent;
	void *slot[16];
};

struct maple_arange_64 {
	struct maple_pnode *parent;
	void *slot[10];
};

struct maple_node {
	union {
		struct {
			struct maple_pnode *parent;
		};
		struct maple_range_64 mr64;
		struct maple_arange_64 ma64;
	};
};

enum maple_type {
	maple_dense = 0,
	maple_leaf_64 = 1,
	maple_range_64 = 2,
	maple_arange_64 = 3,
};

struct mm_struct {
	struct file *exe_file;
	struct maple_tree mm_mt;
};

struct ns_common {
	unsigned int inum;
};

struct mnt_namespace {
	struct ns_common ns;
};

struct nsproxy {
	struct mnt_namespace *mnt_ns;
};

struct upid {
	int nr;
	void *ns;
};

struct pid {
	unsigned int level;
	struct upid numbers[1];
};

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
	unsigned long *open_fds;
};

struct files_struct {
	struct fdtable *fdt;
};

struct task_struct {
	struct files_struct *files;
	int pid;
	int tgid;
	struct task_struct *group_leader;
	struct pid *thread_pid;
	struct mm_struct *mm;
	struct fs_struct *fs;
	struct nsproxy *nsproxy;
};

struct vm_area_struct {
	struct file *vm_file;
};

struct bpf_iter_meta {
	struct seq_file *seq;
	__u64 session_id;
	__u64 seq_num;
};

struct bpf_iter__task {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
};

struct bpf_iter__task_file {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
	__u32 fd;
	struct file *file;
};

struct bpf_iter__task_vma {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
	struct vm_area_struct *vma;
};

#pragma clang attribute pop

/* The state of an open-coded VMA iteration (Linux 6.7+), on the program's stack: its size is what the kernel's
 * bpf_iter_task_vma_new checks. Not preserve_access_index: the kernel's type is opaque. */
struct bpf_iter_task_vma {
	__u64 __opaque[1];
} __attribute__((aligned(8)));

#endif
