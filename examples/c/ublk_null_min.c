// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * ublk_null_min.c: the smallest complete ublk server we could write, in C,
 * without liburing: raw io_uring_setup/io_uring_enter and hand-filled SQEs.
 *
 * It creates a "null" block device (/dev/ublkbN): reads return zeros, writes
 * are discarded. One queue, QUEUE_DEPTH tags. It prints the block device path
 * on stdout once the device is live, and tears everything down on
 * SIGTERM/SIGINT (or after --serve-seconds N).
 *
 * The order of operations is the whole point (see docs/abi.md):
 *   1. /dev/ublk-control + an io_uring created with IORING_SETUP_SQE128
 *      (control commands carry a 32-byte payload at SQE byte 48..79);
 *   2. GET_FEATURES (6.5+) decides the opcode encoding: ioctl-encoded
 *      UBLK_U_* if the kernel reports UBLK_F_CMD_IOCTL_ENCODE, else the legacy
 *      numbers (6.1 accepts only those);
 *   3. ADD_DEV, SET_PARAMS; open /dev/ublkcN; mmap the descriptor array;
 *   4. the queue thread FETCH_REQs every tag (64-byte SQEs, the 16-byte
 *      ublksrv_io_cmd at SQE byte 48..63), from its own ring, and later
 *      submits every COMMIT_AND_FETCH_REQ of that queue itself;
 *   5. another thread (main) sends START_DEV, which blocks in the kernel until
 *      every tag is fetched, then creates /dev/ublkbN;
 *   6. STOP_DEV (outstanding commands complete with UBLK_IO_RES_ABORT), join
 *      the queue thread, munmap + close /dev/ublkcN, then DEL_DEV (which waits
 *      for the char device to be released).
 *
 * Build: cc -O2 -Wall -pthread ublk_null_min.c -o ublk-c-example
 * Needs root (CAP_SYS_ADMIN) and the ublk_drv module.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <poll.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/io_uring.h>
#include <linux/ioctl.h>
#include <linux/ublk_cmd.h>

/* Headers before 6.4 (Debian 12's 6.1) have only the legacy numbers; the
 * encoded forms are _IOR/_IOWR('u', nr, payload struct), as in newer headers. */
#ifndef UBLK_U_CMD_ADD_DEV
#define UBLK_U_CMD_ADD_DEV _IOWR('u', UBLK_CMD_ADD_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_DEL_DEV _IOWR('u', UBLK_CMD_DEL_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_DEV _IOWR('u', UBLK_CMD_START_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_STOP_DEV _IOWR('u', UBLK_CMD_STOP_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_SET_PARAMS _IOWR('u', UBLK_CMD_SET_PARAMS, struct ublksrv_ctrl_cmd)
#endif
#ifndef UBLK_U_IO_FETCH_REQ
#define UBLK_U_IO_FETCH_REQ _IOWR('u', UBLK_IO_FETCH_REQ, struct ublksrv_io_cmd)
#define UBLK_U_IO_COMMIT_AND_FETCH_REQ _IOWR('u', UBLK_IO_COMMIT_AND_FETCH_REQ, struct ublksrv_io_cmd)
#endif
#ifndef UBLK_F_CMD_IOCTL_ENCODE
#define UBLK_F_CMD_IOCTL_ENCODE (1ULL << 6)
#endif

#define QUEUE_DEPTH 8
#define MAX_IO_BYTES (512 << 10)
#define DEV_SIZE (256ULL << 20)
#define STOP_TAG 0xffffULL /* user_data of the stop-eventfd poll */

/* The SQE layout this program relies on (identical in every kernel). */
_Static_assert(offsetof(struct io_uring_sqe, cmd_op) == 8, "cmd_op at byte 8");
_Static_assert(offsetof(struct io_uring_sqe, cmd) == 48, "payload at byte 48");
_Static_assert(sizeof(struct ublksrv_io_cmd) == 16, "io payload is 16 bytes");
_Static_assert(sizeof(struct ublksrv_ctrl_cmd) == 32, "control payload is 32 bytes");

/* ---- a minimal io_uring: one SQ, one CQ, SQEs of 64 or 128 bytes ---- */
struct ring {
	int fd;
	unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, sq_entries, to_submit;
	unsigned *cq_head, *cq_tail, *cq_mask;
	struct io_uring_cqe *cqes;
	char *sqes;
	size_t sqe_size, sq_len, cq_len, sqes_len;
	void *sq_ptr, *cq_ptr;
};

static int ring_init(struct ring *r, unsigned entries, unsigned flags)
{
	struct io_uring_params p;
	memset(&p, 0, sizeof(p));
	memset(r, 0, sizeof(*r));
	p.flags = flags;
	r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
	if (r->fd < 0)
		return -errno;
	r->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
	r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	r->sq_ptr = mmap(NULL, r->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQ_RING);
	r->cq_ptr = mmap(NULL, r->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_CQ_RING);
	r->sqe_size = (flags & IORING_SETUP_SQE128) ? 128 : 64; /* SQE i is at i * sqe_size */
	r->sqes_len = p.sq_entries * r->sqe_size;
	r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
	if (r->sq_ptr == MAP_FAILED || r->cq_ptr == MAP_FAILED || r->sqes == MAP_FAILED)
		return -errno;
	r->sq_head = (unsigned *)((char *)r->sq_ptr + p.sq_off.head);
	r->sq_tail = (unsigned *)((char *)r->sq_ptr + p.sq_off.tail);
	r->sq_mask = (unsigned *)((char *)r->sq_ptr + p.sq_off.ring_mask);
	r->sq_array = (unsigned *)((char *)r->sq_ptr + p.sq_off.array);
	r->sq_entries = p.sq_entries;
	r->cq_head = (unsigned *)((char *)r->cq_ptr + p.cq_off.head);
	r->cq_tail = (unsigned *)((char *)r->cq_ptr + p.cq_off.tail);
	r->cq_mask = (unsigned *)((char *)r->cq_ptr + p.cq_off.ring_mask);
	r->cqes = (struct io_uring_cqe *)((char *)r->cq_ptr + p.cq_off.cqes);
	return 0;
}

static void ring_exit(struct ring *r)
{
	munmap(r->sqes, r->sqes_len);
	munmap(r->cq_ptr, r->cq_len);
	munmap(r->sq_ptr, r->sq_len);
	close(r->fd);
}

/* A zeroed SQE slot (stale bytes in ioprio, __pad1, uring_cmd_flags or
 * personality make io_uring itself fail the command with -EINVAL). */
static struct io_uring_sqe *ring_sqe(struct ring *r)
{
	unsigned tail = *r->sq_tail, idx = tail & *r->sq_mask;
	if (tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE) >= r->sq_entries)
		return NULL;
	struct io_uring_sqe *sqe = (struct io_uring_sqe *)(r->sqes + idx * r->sqe_size);
	memset(sqe, 0, r->sqe_size);
	r->sq_array[idx] = idx;
	__atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
	r->to_submit++;
	return sqe;
}

/* Submits what is queued and waits for at least `wait` completions. */
static int ring_enter(struct ring *r, unsigned wait)
{
	for (;;) {
		int n = (int)syscall(__NR_io_uring_enter, r->fd, r->to_submit, wait, wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
		if (n >= 0) {
			r->to_submit -= (unsigned)n;
			return 0;
		}
		if (errno != EINTR)
			return -errno;
	}
}

/* Pops one CQE (copied out), or returns 0 if the CQ is empty. */
static int ring_cqe(struct ring *r, struct io_uring_cqe *out)
{
	unsigned head = *r->cq_head;
	if (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE))
		return 0;
	*out = r->cqes[head & *r->cq_mask];
	__atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
	return 1;
}

/* ---- ublk ---- */
static int use_ioctl_encoding; /* from GET_FEATURES; 0 = legacy numbers */
#define CTRL_OP(x) (use_ioctl_encoding ? UBLK_U_CMD_##x : UBLK_CMD_##x)
#define IO_OP(x) (use_ioctl_encoding ? UBLK_U_IO_##x : UBLK_IO_##x)

static int ctrl_fd, char_fd = -1;
static struct ring ctrl_ring;
static struct ublksrv_ctrl_dev_info info;
static const struct ublksrv_io_desc *descs; /* read-only, written by the kernel */
static size_t descs_len;
static char *bufs; /* one MAX_IO_BYTES buffer per tag */
static int stop_efd;
static sem_t fetched;
static int fetch_error, queue_failed;

/* One control command: 128-byte SQE, cmd_op at byte 8, ublksrv_ctrl_cmd at
 * byte 48. Returns the CQE result (negative errno on failure). */
static int ctrl_cmd(unsigned op, struct ublksrv_ctrl_cmd *c)
{
	struct io_uring_sqe *sqe = ring_sqe(&ctrl_ring);
	struct io_uring_cqe cqe;
	int ret;
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = ctrl_fd;
	sqe->cmd_op = op;
	memcpy(sqe->cmd, c, sizeof(*c));
	if ((ret = ring_enter(&ctrl_ring, 1)) < 0)
		return ret;
	while (!ring_cqe(&ctrl_ring, &cqe))
		if ((ret = ring_enter(&ctrl_ring, 1)) < 0)
			return ret;
	return cqe.res;
}

static int dev_cmd(unsigned op)
{
	struct ublksrv_ctrl_cmd c = { .dev_id = info.dev_id, .queue_id = (__u16)-1 };
	if (op == CTRL_OP(START_DEV))
		c.data[0] = (__u64)getpid(); /* 6.17+: must be the pid that opened /dev/ublkcN */
	return ctrl_cmd(op, &c);
}

/* One io command: 64-byte SQE, cmd_op at byte 8, ublksrv_io_cmd at byte 48. */
static void io_cmd(struct ring *r, unsigned op, __u16 tag, __s32 result)
{
	struct io_uring_sqe *sqe = ring_sqe(r); /* never NULL: one slot per tag + 1 */
	struct ublksrv_io_cmd *cmd = (struct ublksrv_io_cmd *)sqe->cmd;
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = char_fd;
	sqe->cmd_op = op;
	sqe->user_data = tag;
	cmd->q_id = 0;
	cmd->tag = tag;
	cmd->result = result;
	cmd->addr = (__u64)(uintptr_t)(bufs + (size_t)tag * MAX_IO_BYTES);
}

/* The null target: reads are zeros, everything else succeeds. */
static int handle(__u16 tag)
{
	const struct ublksrv_io_desc *iod = &descs[tag];
	unsigned len = iod->nr_sectors << 9;
	switch (iod->op_flags & 0xff) {
	case UBLK_IO_OP_READ:
		memset(bufs + (size_t)tag * MAX_IO_BYTES, 0, len);
		return (int)len;
	case UBLK_IO_OP_WRITE:
		return (int)len;
	case UBLK_IO_OP_FLUSH: case UBLK_IO_OP_DISCARD: case UBLK_IO_OP_WRITE_ZEROES:
		return 0;
	default:
		return -EOPNOTSUPP;
	}
}

/* The queue thread: every FETCH and every COMMIT of queue 0 comes from here.
 * (6.1-6.15 bind the queue to the task that fetched its last tag, 6.16+ bind
 * each tag to the task that fetched it; requests are delivered to that task.) */
static void *queue_thread(void *arg)
{
	struct ring r;
	struct io_uring_cqe cqe;
	int live = QUEUE_DEPTH, ret;
	(void)arg;
	if ((ret = ring_init(&r, QUEUE_DEPTH + 1, 0)) < 0) { /* 64-byte SQEs suffice */
		fetch_error = ret;
		sem_post(&fetched);
		return NULL;
	}
	for (__u16 tag = 0; tag < QUEUE_DEPTH; tag++)
		io_cmd(&r, IO_OP(FETCH_REQ), tag, -1);
	struct io_uring_sqe *sqe = ring_sqe(&r); /* wakes us at teardown */
	sqe->opcode = IORING_OP_POLL_ADD;
	sqe->fd = stop_efd;
	sqe->poll_events = POLLIN;
	sqe->user_data = STOP_TAG;
	ret = ring_enter(&r, 0);
	/* An accepted FETCH completes only when a request arrives; a refused one
	 * completes during the submit. So any CQE now is a refusal. */
	if (ret == 0 && ring_cqe(&r, &cqe))
		ret = cqe.res < 0 ? cqe.res : -EPROTO;
	fetch_error = ret;
	sem_post(&fetched);
	if (ret < 0)
		goto out;
	while (live > 0) {
		if ((ret = ring_enter(&r, 1)) < 0)
			break;
		while (live > 0 && ring_cqe(&r, &cqe)) {
			__u16 tag = (__u16)cqe.user_data;
			if (cqe.user_data == STOP_TAG)
				live = 0; /* STOP_DEV was sent: leave, closing the ring cancels the rest */
			else if (cqe.res == UBLK_IO_RES_OK)
				io_cmd(&r, IO_OP(COMMIT_AND_FETCH_REQ), tag, handle(tag));
			else if (cqe.res == UBLK_IO_RES_ABORT)
				live--; /* the device is going away */
			else {
				fprintf(stderr, "ublk-c-example: tag %u: io command failed: %s\n", tag, strerror(-cqe.res));
				queue_failed = 1;
				live--;
			}
		}
	}
out:
	if (ret < 0 || queue_failed) {
		queue_failed = 1;
		kill(getpid(), SIGTERM); /* wake main: tear down */
	}
	ring_exit(&r);
	return NULL;
}

int main(int argc, char **argv)
{
	long serve_seconds = 0;
	int ret, started = 0, status = 1;
	pthread_t qt;
	sigset_t sigs;

	if (argc == 3 && !strcmp(argv[1], "--serve-seconds"))
		serve_seconds = atol(argv[2]);
	else if (argc != 1) {
		fprintf(stderr, "usage: %s [--serve-seconds N]\n", argv[0]);
		return 2;
	}
	/* Block SIGTERM/SIGINT in every thread; main collects them with sigwait. */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);

	ctrl_fd = open("/dev/ublk-control", O_RDWR | O_CLOEXEC);
	if (ctrl_fd < 0) {
		perror("ublk-c-example: /dev/ublk-control (modprobe ublk_drv; run as root)");
		return 1;
	}
	if ((ret = ring_init(&ctrl_ring, 4, IORING_SETUP_SQE128)) < 0) {
		fprintf(stderr, "ublk-c-example: io_uring_setup(SQE128): %s\n", strerror(-ret));
		return 1;
	}
#ifdef UBLK_U_CMD_GET_FEATURES
	{ /* 6.5+. Older kernels fail it (e.g. 6.1: -ENODEV): legacy opcodes. */
		__u64 features = 0;
		struct ublksrv_ctrl_cmd c = { .dev_id = (__u32)-1, .queue_id = (__u16)-1,
					      .addr = (__u64)(uintptr_t)&features, .len = sizeof(features) };
		int r = ctrl_cmd(UBLK_U_CMD_GET_FEATURES, &c);
		if (r == 0 && (features & UBLK_F_CMD_IOCTL_ENCODE))
			use_ioctl_encoding = 1;
		fprintf(stderr, "ublk-c-example: GET_FEATURES: %s, features 0x%llx: %s opcodes\n", r ? strerror(-r) : "ok",
			(unsigned long long)features, use_ioctl_encoding ? "ioctl-encoded" : "legacy");
	}
#endif

	/* ADD_DEV: the kernel picks the id and writes back the info it uses
	 * (nr_hw_queues clamped to the CPU count, negotiated flags). */
	info.nr_hw_queues = 1;
	info.queue_depth = QUEUE_DEPTH;
	info.max_io_buf_bytes = MAX_IO_BYTES;
	info.dev_id = (__u32)-1;
	info.ublksrv_pid = getpid();
	struct ublksrv_ctrl_cmd add = { .dev_id = (__u32)-1, .queue_id = (__u16)-1,
					.addr = (__u64)(uintptr_t)&info, .len = sizeof(info) };
	if ((ret = ctrl_cmd(CTRL_OP(ADD_DEV), &add)) < 0) {
		fprintf(stderr, "ublk-c-example: ADD_DEV: %s\n", strerror(-ret));
		return 1;
	}
	fprintf(stderr, "ublk-c-example: device %u, %u queue(s), depth %u\n", info.dev_id, info.nr_hw_queues, info.queue_depth);

	/* SET_PARAMS: the basic parameters are mandatory before START_DEV. */
	struct ublk_params params;
	memset(&params, 0, sizeof(params));
	params.len = sizeof(params); /* a newer header's bigger struct is fine for older kernels */
	params.types = UBLK_PARAM_TYPE_BASIC;
	params.basic.logical_bs_shift = 9;
	params.basic.physical_bs_shift = 12;
	params.basic.io_opt_shift = 12;
	params.basic.io_min_shift = 9;
	params.basic.max_sectors = info.max_io_buf_bytes >> 9;
	params.basic.dev_sectors = DEV_SIZE >> 9;
	struct ublksrv_ctrl_cmd sp = { .dev_id = info.dev_id, .queue_id = (__u16)-1,
				       .addr = (__u64)(uintptr_t)&params, .len = sizeof(params) };
	if ((ret = ctrl_cmd(CTRL_OP(SET_PARAMS), &sp)) < 0) {
		fprintf(stderr, "ublk-c-example: SET_PARAMS: %s\n", strerror(-ret));
		goto del;
	}

	/* The char device (udev may need a moment), then queue 0's descriptors:
	 * read-only, at q_id * round_up(UBLK_MAX_QUEUE_DEPTH * 24, page). */
	char path[32];
	snprintf(path, sizeof(path), "/dev/ublkc%u", info.dev_id);
	for (int i = 0; i < 300 && (char_fd = open(path, O_RDWR | O_CLOEXEC)) < 0 && errno == ENOENT; i++)
		usleep(10000);
	if (char_fd < 0) {
		perror("ublk-c-example: open /dev/ublkcN");
		goto del;
	}
	long page = sysconf(_SC_PAGESIZE);
	size_t stride = (UBLK_MAX_QUEUE_DEPTH * sizeof(struct ublksrv_io_desc) + page - 1) / page * page;
	off_t q0_off = UBLKSRV_CMD_BUF_OFFSET + 0 * stride;
	descs_len = (info.queue_depth * sizeof(struct ublksrv_io_desc) + page - 1) / page * page;
	descs = mmap(NULL, descs_len, PROT_READ, MAP_SHARED | MAP_POPULATE, char_fd, q0_off);
	bufs = mmap(NULL, (size_t)QUEUE_DEPTH * MAX_IO_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (descs == MAP_FAILED || bufs == MAP_FAILED) {
		perror("ublk-c-example: mmap");
		goto close_char;
	}

	/* Queue thread: FETCH every tag. Main waits until the kernel accepted
	 * them all, then START_DEV (it would also block until then). */
	stop_efd = eventfd(0, EFD_CLOEXEC);
	sem_init(&fetched, 0, 0);
	if (pthread_create(&qt, NULL, queue_thread, NULL) != 0)
		goto close_char;
	sem_wait(&fetched);
	if (fetch_error < 0) {
		fprintf(stderr, "ublk-c-example: FETCH_REQ: %s\n", strerror(-fetch_error));
		goto stop;
	}
	if ((ret = dev_cmd(CTRL_OP(START_DEV))) < 0) {
		fprintf(stderr, "ublk-c-example: START_DEV: %s\n", strerror(-ret));
		goto stop;
	}
	started = 1;
	printf("/dev/ublkb%u\n", info.dev_id);
	fflush(stdout);

	if (serve_seconds > 0) {
		struct timespec ts = { .tv_sec = serve_seconds };
		sigtimedwait(&sigs, NULL, &ts);
	} else {
		int sig;
		sigwait(&sigs, &sig);
	}
	status = 0;

stop:
	/* STOP_DEV removes /dev/ublkbN and aborts the outstanding FETCHes. */
	if ((ret = dev_cmd(CTRL_OP(STOP_DEV))) < 0) {
		fprintf(stderr, "ublk-c-example: STOP_DEV: %s\n", strerror(-ret));
		status = 1;
	}
	eventfd_write(stop_efd, 1);
	pthread_join(qt, NULL);
	if (queue_failed)
		status = 1;
close_char:
	/* DEL_DEV waits until /dev/ublkcN is released: unmap and close first. */
	if (descs && descs != MAP_FAILED)
		munmap((void *)descs, descs_len);
	if (char_fd >= 0)
		close(char_fd);
del:
	if ((ret = dev_cmd(CTRL_OP(DEL_DEV))) < 0) {
		fprintf(stderr, "ublk-c-example: DEL_DEV: %s\n", strerror(-ret));
		status = 1;
	}
	ring_exit(&ctrl_ring);
	close(ctrl_fd);
	if (!started)
		status = 1;
	return status;
}
