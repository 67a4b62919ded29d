// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * The agent's in-kernel usage scan: iterators over every task visible in the reader's pid namespace that write one
 * record per use of a watched device, filtering in the kernel (printing everything and filtering in userspace
 * doubles the cost). The agent writes the device numbers of one scan into `devices` and reads the iterators; what
 * it gets is the set of processes to look at through /proc, where names, paths and access modes come from as they
 * do for the /proc scanner.
 *
 * Two ways to walk, the same records:
 *  - per process (Linux 6.7+): one `iter/task` program walks each process's files table and its mappings itself
 *    (`usage_processes`). The kernel calls it once per task instead of once per file and per mapping, and the
 *    agent reads one such iterator per CPU, each for its share of the processes (`shard` of `shards`). Mappings
 *    are read from the process's maple tree, or through the VMA iterator where that is not safe (`walk_mappings`).
 *  - per element (Linux 5.12+): `iter/task_file`, `iter/task` and `iter/task_vma`, one call per file, task and
 *    mapping (`usage_files`, `usage_tasks`, `usage_mappings`); the agent falls back to these on older kernels.
 * `usage_namespaces` lists every process's mount namespace, for both.
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
	/* Not a use: a process whose files or mappings could not be walked (its mappings locked by a writer, a files
	 * table larger than bpf_loop walks); the agent reads it through /proc like any candidate. */
	USE_UNWALKED = 7,
	/* Not a use: one of the uses above found through a thread whose files table, directories or memory are not its
	 * leader's (unshare(CLONE_FILES), unshare(CLONE_FS), or a leader that has exited, taking its own with it).
	 * /proc shows such a use under the thread alone, so the agent reads the process whole, threads included. */
	USE_THREAD = 8,
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

/* The watched device an inode is on, or 0. Plain loads: the verifier turns each into a load that cannot fault
 * (BPF_PROBE_MEM), as cheap as the kernel's own, where bpf_probe_read_kernel is a call each. */
static __always_inline __u32 inode_device(struct inode *inode)
{
	if (!inode)
		return 0;
	struct super_block *sb = inode->i_sb;
	if (sb) {
		__u32 dev = sb->s_dev;
		if (watched(dev))
			return dev;
		struct block_device *bdev = sb->s_bdev;
		if (bdev) {
			dev = bdev->bd_dev;
			if (watched(dev))
				return dev;
		}
	}
	if ((inode->i_mode & S_IFMT) == S_IFBLK) {
		__u32 rdev = inode->i_rdev;
		if (watched(rdev))
			return rdev;
	}
	return 0;
}

static __always_inline __u32 file_device(struct file *file)
{
	return file ? inode_device(file->f_inode) : 0;
}

static __always_inline __u32 path_device(struct dentry *dentry)
{
	return dentry ? inode_device(dentry->d_inode) : 0;
}

/* A task's id (a thread-group leader's: its process's pid) as the reader's /proc names it. */
static __always_inline __u32 task_id(struct task_struct *task)
{
	__u32 level = pid_level;
	if (level == 0)
		return task->pid;
	if (level > 31)
		return 0;
	struct pid *pid = task->thread_pid;
	int nr = 0;
	if (pid)
		bpf_core_read(&nr, sizeof(nr), &pid->numbers[level].nr);
	return nr;
}

/* The process's pid as the reader's /proc names it. */
static __always_inline __u32 process_id(struct task_struct *task)
{
	return task_id(task->group_leader);
}

static __always_inline void emit(struct seq_file *seq, struct task_struct *task, __u32 kind, __u32 fd, __u32 dev)
{
	if (task->pid != task->tgid && kind != USE_UNWALKED) {
		kind = USE_THREAD;
		fd = 0;
	}
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

/* The working and root directory of a task. */
static __always_inline void emit_dirs(struct seq_file *seq, struct task_struct *task)
{
	struct fs_struct *fs = task->fs;
	if (fs) {
		__u32 dev = path_device(fs->pwd.dentry);
		if (dev)
			emit(seq, task, USE_CWD, 0, dev);
		dev = path_device(fs->root.dentry);
		if (dev)
			emit(seq, task, USE_ROOT, 0, dev);
	}
}

/* The program a task runs. */
static __always_inline void emit_exe(struct seq_file *seq, struct task_struct *task)
{
	struct mm_struct *mm = task->mm;
	if (mm) {
		__u32 dev = file_device(mm->exe_file);
		if (dev)
			emit(seq, task, USE_EXE, 0, dev);
	}
}

/* Whether a thread's directories are its own: unshare(CLONE_FS), or its leader has exited and dropped its own. */
static __always_inline bool thread_has_own_dirs(struct task_struct *task)
{
	return task->fs && task->fs != task->group_leader->fs;
}

/* Whether a thread's leader has exited: the process's program and mappings, which /proc showed through the
 * leader, are then seen through its threads alone. */
static __always_inline bool leader_gone(struct task_struct *task)
{
	return task->mm && !task->group_leader->mm;
}

/* The directories and program of each thread-group leader, and of a thread where they are its own (the
 * per-element walk). */
SEC("iter/task")
int usage_tasks(struct bpf_iter__task *ctx)
{
	struct task_struct *task = ctx->task;
	if (!task)
		return 0;
	struct seq_file *seq = ctx->meta->seq;
	bool leader = task->pid == task->tgid;
	if (leader || thread_has_own_dirs(task))
		emit_dirs(seq, task);
	if (leader || leader_gone(task))
		emit_exe(seq, task);
	return 0;
}

/* The mount namespace of each thread-group leader, and of each thread in another one than its leader (a namespace
 * of its own, or the leader has exited and left none), read before each scan (either walk) to find its mounts. A
 * thread's record carries its id where a file's carries its descriptor. */
SEC("iter/task")
int usage_namespaces(struct bpf_iter__task *ctx)
{
	struct task_struct *task = ctx->task;
	if (!task)
		return 0;
	struct nsproxy *nsproxy = task->nsproxy;
	if (!nsproxy)
		return 0;
	struct mnt_namespace *ns = nsproxy->mnt_ns;
	__u32 thread = 0;
	if (task->pid != task->tgid) {
		struct nsproxy *leaders = task->group_leader->nsproxy;
		if (leaders && leaders->mnt_ns == ns)
			return 0;
		thread = task_id(task);
	}
	struct record r = { .pid = process_id(task), .kind = USE_MOUNT_NS, .fd = thread, .dev = ns->ns.inum };
	bpf_seq_write(ctx->meta->seq, &r, sizeof(r));
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
	__u32 dev = file_device(vma->vm_file);
	if (dev)
		emit(ctx->meta->seq, task, USE_MAP, 0, dev);
	return 0;
}

/*
 * Per process (Linux 6.7+). The agent's loader (aya 0.14) cannot link calls to kernel functions (kfuncs), so each
 * is written as the raw call instruction (opcode 0x85, src_reg 2: BPF_PSEUDO_KFUNC_CALL) with a marker in its
 * immediate, 0x7eed00NN, that the agent replaces with the function's BTF id in the running kernel before loading
 * (bpf_scan.rs, `KFUNCS`, whose numbers these are). A kernel without one of them refuses nothing: the agent sees the
 * name missing from its BTF and loads the per-element iterators instead.
 */
#define KFUNC_CALL(n) ".quad 0x7eed00" #n "00002085"

/* Calls kernel function n with arguments a, b, c in r1-r3 (it reads only those it takes) and puts what it returns
 * (r0) in `result`. */
#define KFUNC(n, result, a, b, c)                                                                                  \
	asm volatile("r1 = %[arg1]\n\t"                                                                            \
		     "r2 = %[arg2]\n\t"                                                                            \
		     "r3 = %[arg3]\n\t" KFUNC_CALL(n) "\n\t"                                                        \
		     "%[ret] = r0"                                                                                 \
		     : [ret] "=r"(result)                                                                          \
		     : [arg1] "r"(a), [arg2] "r"(b), [arg3] "r"(c)                                                 \
		     : "r0", "r1", "r2", "r3", "r4", "r5", "memory")

static __always_inline int vma_iter_new(struct bpf_iter_task_vma *it, struct task_struct *task)
{
	int ret;
	KFUNC(01, ret, it, task, 0);
	return ret;
}

static __always_inline struct vm_area_struct *vma_iter_next(struct bpf_iter_task_vma *it)
{
	struct vm_area_struct *vma;
	KFUNC(02, vma, it, 0, 0);
	return vma;
}

/* Returns nothing: r0 is not to be read after it (the verifier refuses a read of it). */
static __always_inline void vma_iter_destroy(struct bpf_iter_task_vma *it)
{
	asm volatile("r1 = %[it]\n\t" KFUNC_CALL(03) : : [it] "r"(it) : "r0", "r1", "r2", "r3", "r4", "r5", "memory");
}

/* A kernel address read as a number (from a files table, a maple tree node) made a `struct type` pointer the verifier
 * lets the program load through: bpf_rdonly_cast (Linux 6.2+), whose second argument is the type's BTF id in the
 * running kernel. */
#define AS_KERNEL(type, address)                                                                                   \
	({                                                                                                         \
		struct type *cast;                                                                                 \
		KFUNC(04, cast, address, bpf_core_type_id_kernel(struct type), 0);                                 \
		cast;                                                                                              \
	})

/* The shard of the processes this copy of the program walks, of how many (one per CPU the agent reads on), set at
 * load. A process's shard is its tgid hashed (Fibonacci hashing), not the tgid's remainder: pids come in patterns
 * (a launcher that forks twice per process gives them all the same parity). */
const volatile __u32 shard = 0;
const volatile __u32 shards = 1;

/* One files table's walk: bpf_loop over the words of its open-fd bitmap, and for each word with a bit set, over its
 * bits up to the last one set. A table is as large as the most files its process (or the one it was forked from)
 * ever had open, so walking every slot would cost a long-lived server's thousands of empty ones. */
struct fd_walk {
	struct file **fd;
	unsigned long *open_fds;
	__u64 word;
	__u32 first;
	struct seq_file *seq;
	struct task_struct *task;
};

static int fd_bit(__u32 bit, struct fd_walk *walk)
{
	__u64 rest = walk->word >> bit;
	if (!rest)
		return 1;
	if (!(rest & 1))
		return 0;
	__u32 fd = walk->first + bit;
	struct file *number = 0;
	if (bpf_probe_read_kernel(&number, sizeof(number), &walk->fd[fd])) {
		emit(walk->seq, walk->task, USE_UNWALKED, 0, 0);
		return 1;
	}
	if (!number)
		return 0;
	__u32 dev = file_device(AS_KERNEL(file, number));
	if (dev)
		emit(walk->seq, walk->task, USE_FD, fd, dev);
	return 0;
}

static int fd_word(__u32 index, struct fd_walk *walk)
{
	/* Under RCU the table stays readable; were it not, the process is left to /proc rather than half walked. */
	if (bpf_probe_read_kernel(&walk->word, sizeof(walk->word), &walk->open_fds[index])) {
		emit(walk->seq, walk->task, USE_UNWALKED, 0, 0);
		return 1;
	}
	if (walk->word) {
		walk->first = index * 64;
		bpf_loop(64, fd_bit, walk, 0);
	}
	return 0;
}

/* Every open file of a files table (under RCU, as the iterator runs: the table and its files stay readable). */
static __always_inline void walk_files(struct seq_file *seq, struct task_struct *task, struct files_struct *files)
{
	struct fdtable *fdt = files->fdt;
	if (!fdt)
		return;
	struct fd_walk walk = { .fd = fdt->fd, .open_fds = fdt->open_fds, .seq = seq, .task = task };
	if (bpf_loop((fdt->max_fds + 63) / 64, fd_word, &walk, 0) < 0)
		emit(seq, task, USE_UNWALKED, 0, 0);
}

/* How the per-process walk reads mappings, set at load (the agent's `Mappings`): from the maple tree, else through the
 * VMA iterator (the agent's way); through the VMA iterator alone; from the maple tree alone, a process whose tree
 * cannot be read left to /proc (tests compare the three). */
#define MAPPINGS_TREE 0
#define MAPPINGS_ITERATOR 1
#define MAPPINGS_TREE_ONLY 2
const volatile __u32 mappings = MAPPINGS_TREE;

/*
 * A process's mappings read straight from the maple tree they are kept in (mm->mm_mt), under the RCU read lock the
 * iterator runs in: what the kernel's own lockless readers do (the page-fault path since Linux 6.4). The VMA
 * iterator costs a lookup from the tree's root, a VMA lock and a file reference per mapping, about half of the whole
 * walk; this reads each node of the tree once.
 *
 * Safe because the tree is in RCU mode (MT_FLAGS_USE_RCU, every mm's since 6.4 until it is torn down): a writer
 * never changes a node a reader may be in but one slot at a time, and replaces the node otherwise, marking the old
 * one dead (its parent pointer pointing to itself) and freeing it only after the readers' grace period. A mapping
 * that stays throughout the walk is therefore in every version of its leaf the walk may read. A stale slot
 * (beyond a node's data, or in a node replaced meanwhile) can only add a process to look at through /proc, never
 * hide one. Anything unexpected (not in RCU mode, a dead node, an unknown node type, a tree deeper or larger than
 * the walk's bounds) hands the process to the VMA iterator, which takes the locks.
 *
 * The node encoding is not in BTF (include/linux/maple_tree.h): a node is 256-byte aligned, its pointer carries
 * the node's type in bits 3-6, and the root pointer bit 1 (MAPLE_ROOT_NODE); a leaf's slots hold the VMAs (or
 * nothing, for a gap), an internal node's the child node pointers. The node types and slot counts are checked
 * against the running kernel's BTF.
 */
#define MT_FLAGS_USE_RCU 0x02
#define MAPLE_NODE_MASK 255UL
#define MAPLE_NODE_TYPE_SHIFT 3
#define MAPLE_NODE_TYPE_MASK 0x0f
#define MAPLE_RANGE64_SLOTS 16
#define MAPLE_ARANGE64_SLOTS 10
/* Below it, a maple tree entry is one of the tree's own markers (MAPLE_RESERVED_RANGE), not a pointer. */
#define MAPLE_RESERVED 4096
/* The deepest tree walked: 65,530 mappings (the default vm.max_map_count) need five levels. */
#define MAPLE_DEPTH 10
/* The most internal slots visited (each leaf is read whole in one step). */
#define MAPLE_STEPS (1 << 20)

struct maple_level {
	__u64 node;
	__u32 type;
	__u32 next;
};

struct maple_walk {
	struct seq_file *seq;
	struct task_struct *task;
	struct file *last;
	/* A node pointer to visit before going on with the internal node on top. */
	__u64 pending;
	__u32 depth;
	bool failed;
	struct maple_level level[MAPLE_DEPTH];
	void *slots[MAPLE_RANGE64_SLOTS];
};

/* Whether the node at `address` was replaced (ma_dead_node): a reader in it must not trust what it read. */
static __always_inline bool maple_dead(__u64 address)
{
	return ((__u64)AS_KERNEL(maple_node, address)->parent & ~MAPLE_NODE_MASK) == address;
}

static __always_inline int maple_fail(struct maple_walk *walk)
{
	walk->failed = true;
	return 1;
}

/* The VMA in slot `i` of the leaf read into `walk->slots`, if any. */
static int maple_slot(__u32 i, struct maple_walk *walk)
{
	if (i >= MAPLE_RANGE64_SLOTS)
		return 1;
	__u64 entry = (__u64)walk->slots[i];
	if (entry < MAPLE_RESERVED || entry & 7)
		return 0;
	struct file *file = AS_KERNEL(vm_area_struct, walk->slots[i])->vm_file;
	if (!file || file == walk->last)
		return 0;
	walk->last = file;
	__u32 dev = file_device(file);
	if (dev)
		emit(walk->seq, walk->task, USE_MAP, 0, dev);
	return 0;
}

/* Every VMA in the leaf at `address`, read whole. */
static __always_inline int maple_leaf(struct maple_walk *walk, __u64 address)
{
	if (bpf_probe_read_kernel(walk->slots, sizeof(walk->slots),
				  (void *)(address + bpf_core_field_offset(struct maple_node, mr64.slot))))
		return maple_fail(walk);
	bpf_loop(MAPLE_RANGE64_SLOTS, maple_slot, walk, 0);
	return maple_dead(address) ? maple_fail(walk) : 0;
}

/* One step: the node pending, else the next child of the internal node on top, else that node is done. */
static int maple_step(__u32 index, struct maple_walk *walk)
{
	__u64 enode = walk->pending;
	walk->pending = 0;
	if (!enode) {
		__u32 top = walk->depth - 1;
		if (walk->depth == 0)
			return 1;
		if (top >= MAPLE_DEPTH)
			return maple_fail(walk);
		struct maple_level *level = &walk->level[top];
		__u32 slots = level->type == maple_arange_64 ? MAPLE_ARANGE64_SLOTS : MAPLE_RANGE64_SLOTS;
		if (level->next >= slots) {
			walk->depth = top;
			return maple_dead(level->node) ? maple_fail(walk) : 0;
		}
		__u64 offset = level->type == maple_arange_64 ? bpf_core_field_offset(struct maple_node, ma64.slot)
							      : bpf_core_field_offset(struct maple_node, mr64.slot);
		if (bpf_probe_read_kernel(&enode, sizeof(enode), (void *)(level->node + offset + level->next * 8)))
			return maple_fail(walk);
		level->next++;
		if (!enode)
			return 0;
	}
	if (enode < MAPLE_RESERVED)
		return maple_fail(walk);
	__u64 address = enode & ~MAPLE_NODE_MASK;
	__u32 type = (enode >> MAPLE_NODE_TYPE_SHIFT) & MAPLE_NODE_TYPE_MASK;
	if (type == maple_leaf_64)
		return maple_leaf(walk, address);
	if (type != maple_range_64 && type != maple_arange_64)
		return maple_fail(walk);
	if (walk->depth >= MAPLE_DEPTH)
		return maple_fail(walk);
	walk->level[walk->depth] = (struct maple_level){ .node = address, .type = type };
	walk->depth++;
	return 0;
}

/* Every file mapping of `task` from its maple tree; false when the VMA iterator is to walk them instead. */
static __always_inline bool walk_maple_tree(struct seq_file *seq, struct task_struct *task)
{
	if (mappings == MAPPINGS_ITERATOR)
		return false;
	/* The encoding above, checked against the running kernel's. */
	if (bpf_core_enum_value(enum maple_type, maple_leaf_64) != 1 ||
	    bpf_core_enum_value(enum maple_type, maple_range_64) != 2 ||
	    bpf_core_enum_value(enum maple_type, maple_arange_64) != 3 ||
	    bpf_core_field_size(struct maple_range_64, slot) != MAPLE_RANGE64_SLOTS * 8 ||
	    bpf_core_field_size(struct maple_arange_64, slot) != MAPLE_ARANGE64_SLOTS * 8)
		return false;
	struct mm_struct *mm = task->mm;
	if (!mm || !(mm->mm_mt.ma_flags & MT_FLAGS_USE_RCU))
		return false;
	struct maple_walk walk = { .seq = seq, .task = task };
	/* Read as a number: the walk does arithmetic on node pointers. */
	if (bpf_core_read(&walk.pending, sizeof(walk.pending), &mm->mm_mt.ma_root))
		return false;
	if (!walk.pending)
		return true;
	/* A tree of mappings has a node at its root (xa_is_node: bit 1 set, bit 0 clear), never a lone entry. */
	if ((walk.pending & 3) != 2)
		return false;
	if (bpf_loop(MAPLE_STEPS, maple_step, &walk, 0) < 0 || walk.failed || walk.depth || walk.pending)
		return false;
	return true;
}

/* Every file mapping; a process whose mappings a writer holds locked is left to /proc. */
static __always_inline void walk_mappings(struct seq_file *seq, struct task_struct *task)
{
	if (walk_maple_tree(seq, task))
		return;
	if (mappings == MAPPINGS_TREE_ONLY) {
		emit(seq, task, USE_UNWALKED, 0, 0);
		return;
	}
	struct bpf_iter_task_vma it;
	struct vm_area_struct *vma;
	if (vma_iter_new(&it, task)) {
		emit(seq, task, USE_UNWALKED, 0, 0);
	} else {
		/* A file is mapped in a run of mappings (text, data, read-only data); one look per run will do. */
		struct file *last = 0;
		while ((vma = vma_iter_next(&it))) {
			struct file *file = vma->vm_file;
			if (file == last)
				continue;
			last = file;
			__u32 dev = file_device(file);
			if (dev)
				emit(seq, task, USE_MAP, 0, dev);
		}
	}
	vma_iter_destroy(&it);
}

SEC("iter/task")
int usage_processes(struct bpf_iter__task *ctx)
{
	struct task_struct *task = ctx->task;
	if (!task)
		return 0;
	__u32 tgid = task->tgid;
	if (shards > 1 && ((tgid * 2654435769u) >> 16) % shards != shard)
		return 0;
	struct seq_file *seq = ctx->meta->seq;
	struct files_struct *files = task->files;
	if (task->pid != tgid) {
		/* A thread: only what is not its leader's, as the per-element walk does. Each thread of a process whose
		 * leader has exited walks the process's memory (rare, and never half walked). */
		if (files && files != task->group_leader->files)
			walk_files(seq, task, files);
		if (thread_has_own_dirs(task))
			emit_dirs(seq, task);
		if (leader_gone(task)) {
			emit_exe(seq, task);
			walk_mappings(seq, task);
		}
		return 0;
	}
	emit_dirs(seq, task);
	emit_exe(seq, task);
	if (files)
		walk_files(seq, task, files);
	if (task->mm)
		walk_mappings(seq, task);
	return 0;
}
