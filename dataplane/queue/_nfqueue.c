/* dataplane.queue._nfqueue: nfqueue.py's compiled hot loop (optional: nfqueue.py runs without it).

   serve() reads a batch of queued packets (one blocking recv, then recvmmsg
   while packets wait), walks the nfnetlink_queue attributes and the IPv4
   header, looks the flow's (daddr, protocol, dport) up in a pick table the
   Python side built from the sans-IO balancer (queue/picks.py), picks a slot
   (random or round-robin), counts it, and sends all the verdicts of the batch
   in sendmsg calls of at most 256. A packet the table has no entry for (IPv6,
   affinity, least-conn, no such Service, anything odd) is handed back to
   Python as a PacketQueued, for the balancer itself to decide.

   The GIL is released while blocking in the first recv, and a batch runs
   Python code (a leftover's PacketQueued), where the GIL may pass to another
   thread mid-batch. So once that recv returns the loop takes the caller's
   lock (the forwarder's, which its changes and snapshots hold too) and keeps
   it for the whole batch: the table is read from its holder under the lock,
   so a table swapped in while the loop slept is the one used, and no
   drain() (which reads and zeroes the counts) lands inside a batch. Every
   decision counted here is folded back exactly once.

   Wire format: include/uapi/linux/netfilter/nfnetlink_queue.h (see nfqueue.py). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PACKET_TYPE ((3 << 8) | 0)  /* NFNL_SUBSYS_QUEUE, NFQNL_MSG_PACKET */
#define VERDICT_TYPE ((3 << 8) | 1) /* NFNL_SUBSYS_QUEUE, NFQNL_MSG_VERDICT */
#define NFQA_PACKET_HDR 1
#define NFQA_VERDICT_HDR 2
#define NFQA_MARK 3
#define NFQA_PAYLOAD 10
#define NF_ACCEPT 1
#define RECV_SIZE 4096 /* nfqueue.py's _RECV_SIZE: one packet per datagram, 128 bytes copied */
#define VERDICTS 256   /* per sendmsg, as nfqueue.VERDICTS_PER_DATAGRAM */
#define VERDICT_SIZE 40
#define PICK_RANDOM 0
#define PICK_ROUND_ROBIN 1

static uint64_t rng_state;

static inline uint32_t next_random(void) { /* xorshift64*: the pick needs spread, not secrecy */
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return (uint32_t)((x * 0x2545F4914F6CDD1DULL) >> 32);
}

static inline uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline void put32(unsigned char *p, uint32_t host) { memcpy(p, &host, 4); }
static inline void put16(unsigned char *p, uint16_t host) { memcpy(p, &host, 2); }
static inline void put_be32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

typedef struct {
    int fd;
    unsigned char out[VERDICTS * VERDICT_SIZE];
    int pending;
} Verdicts;

static PyObject *acquire_name, *release_name;

/* Sends the pending verdicts in one datagram: netlink takes a datagram whole or not at all (no partial send). */
static int flush(Verdicts *v) {
    ssize_t length = (ssize_t)v->pending * VERDICT_SIZE;
    while (v->pending) {
        ssize_t sent = send(v->fd, v->out, length, 0);
        if (sent >= 0)
            break;
        if (errno != EAGAIN && errno != EINTR) { /* the kernel takes netlink writes synchronously: EAGAIN is transient */
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    v->pending = 0;
    return 0;
}

static int add_verdict(Verdicts *v, unsigned queue, uint32_t packet_id, uint32_t mark) {
    unsigned char *m = v->out + v->pending * VERDICT_SIZE;
    put32(m, VERDICT_SIZE); put16(m + 4, VERDICT_TYPE); put16(m + 6, 1 /* NLM_F_REQUEST */);
    put32(m + 8, 0); put32(m + 12, 0);
    m[16] = 0; m[17] = 0; m[18] = queue >> 8; m[19] = queue & 0xFF; /* nfgenmsg: AF_UNSPEC, version 0, queue (BE) */
    put16(m + 20, 12); put16(m + 22, NFQA_VERDICT_HDR); put_be32(m + 24, NF_ACCEPT); put_be32(m + 28, packet_id);
    put16(m + 32, 8); put16(m + 34, NFQA_MARK); put_be32(m + 36, mark);
    if (++v->pending == VERDICTS)
        return flush(v);
    return 0;
}

/* The table key of an IPv4 TCP/UDP/SCTP first fragment (picks.key()), or -1 for anything else. */
static long long flow_key(const unsigned char *ip, size_t size) {
    if (size < 20 || (ip[0] >> 4) != 4)
        return -1;
    size_t ihl = (size_t)(ip[0] & 0x0F) * 4;
    unsigned protocol = ip[9];
    unsigned total = ((unsigned)ip[2] << 8) | ip[3];
    if (ihl < 20 || (protocol != 6 && protocol != 17 && protocol != 132))
        return -1;
    if (((((unsigned)ip[6] << 8) | ip[7]) & 0x1FFF) != 0 || total < ihl + 4 || size < ihl + 4)
        return -1;
    unsigned dport = ((unsigned)ip[ihl + 2] << 8) | ip[ihl + 3];
    return ((long long)be32(ip + 16) << 24) | ((long long)protocol << 16) | dport;
}

/* 1: decided (a verdict added); 0: not in the table (the caller hands it to Python); -1: error set. */
static int decide(Verdicts *v, PyObject *table, unsigned queue, uint32_t packet_id, uint32_t mark,
                  uint32_t keep_mask, const unsigned char *payload, size_t size) {
    long long key = flow_key(payload, size);
    if (key < 0)
        return 0;
    PyObject *pykey = PyLong_FromLongLong(key);
    if (pykey == NULL)
        return -1;
    PyObject *entry = PyDict_GetItemWithError(table, pykey); /* borrowed */
    Py_DECREF(pykey);
    if (entry == NULL)
        return PyErr_Occurred() ? -1 : 0;
    /* An entry not of picks.Entry's shape is a bug on the Python side: the balancer decides those packets. */
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) < 4 || !PyLong_CheckExact(PyTuple_GET_ITEM(entry, 0)))
        return 0;
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(entry, 0));
    Py_buffer marks, counts, cursor;
    if (kind == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(entry, 1), &marks, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return 0;
    }
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(entry, 2), &counts, PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        PyBuffer_Release(&marks);
        return 0;
    }
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(entry, 3), &cursor, PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        PyBuffer_Release(&marks);
        PyBuffer_Release(&counts);
        return 0;
    }
    size_t slots = marks.len / 4;
    int result = 0;
    if (slots == 0 || (size_t)counts.len < slots * 8 || cursor.len < 8) {
        result = 0; /* an empty or malformed entry: Python decides */
    } else {
        uint64_t *at = (uint64_t *)cursor.buf;
        size_t slot;
        if (kind == PICK_ROUND_ROBIN) {
            slot = (size_t)(*at % slots);
            *at = slot + 1 == slots ? 0 : slot + 1;
        } else {
            slot = (size_t)(((uint64_t)next_random() * slots) >> 32);
        }
        ((uint64_t *)counts.buf)[slot] += 1;
        result = add_verdict(v, queue, packet_id, (mark & keep_mask) | ((uint32_t *)marks.buf)[slot]) < 0 ? -1 : 1;
    }
    PyBuffer_Release(&marks);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&cursor);
    return result;
}

/* Walks one datagram: decides what the table knows, appends the rest to `leftovers`. Returns packets seen, -1 on error. */
static int walk(Verdicts *v, PyObject *table, uint32_t keep_mask, PyObject *packet_type, PyObject *leftovers,
                const unsigned char *data, size_t size, long *decided) {
    size_t offset = 0;
    int seen = 0;
    while (offset + 16 <= size) {
        uint32_t length;
        uint16_t kind;
        memcpy(&length, data + offset, 4);
        memcpy(&kind, data + offset + 4, 2);
        if (length < 16 || length > size - offset) /* not offset + length > size: that may wrap */
            break;
        size_t end = offset + length;
        if (kind == PACKET_TYPE && length >= 20) {
            unsigned queue = ((unsigned)data[offset + 18] << 8) | data[offset + 19];
            int have_id = 0;
            uint32_t packet_id = 0, mark = 0;
            const unsigned char *payload = (const unsigned char *)"";
            size_t payload_size = 0;
            size_t at = offset + 20;
            while (at + 4 <= end) {
                uint16_t alen, atype;
                memcpy(&alen, data + at, 2);
                memcpy(&atype, data + at + 2, 2);
                if (alen < 4 || at + alen > end)
                    break;
                atype &= 0x3FFF;
                if (atype == NFQA_PAYLOAD) {
                    payload = data + at + 4;
                    payload_size = alen - 4;
                } else if (atype == NFQA_PACKET_HDR && alen >= 8) {
                    packet_id = be32(data + at + 4);
                    have_id = 1;
                } else if (atype == NFQA_MARK && alen >= 8) {
                    mark = be32(data + at + 4);
                }
                at += ((size_t)alen + 3) & ~(size_t)3;
            }
            if (have_id) {
                seen++;
                int done = decide(v, table, queue, packet_id, mark, keep_mask, payload, payload_size);
                if (done < 0)
                    return -1;
                if (done) {
                    (*decided)++;
                } else {
                    PyObject *packet = PyObject_CallFunction(packet_type, "Ikky#", queue, (unsigned long)packet_id,
                                                             (unsigned long)mark, (const char *)payload,
                                                             (Py_ssize_t)payload_size);
                    if (packet == NULL)
                        return -1;
                    int failed = PyList_Append(leftovers, packet);
                    Py_DECREF(packet);
                    if (failed)
                        return -1;
                }
            }
        }
        offset += ((size_t)length + 3) & ~(size_t)3;
    }
    return seen;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec * 1e-9;
}

/* Calls lock.acquire() or lock.release(). On an error path (an exception set) that exception is kept. */
static int lock_call(PyObject *lock, PyObject *name) {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *result = PyObject_CallMethodNoArgs(lock, name);
    Py_XDECREF(result);
    if (type == NULL)
        return result == NULL ? -1 : 0;
    PyErr_Clear();
    PyErr_Restore(type, value, traceback);
    return 0;
}

/* serve(fd, scratch, holder, keep_mask, limit, block, packet_type, lock)
   -> (datagrams read, packets decided here, [PacketQueued left to Python], seconds the first recv took)
   `lock`: held from the first datagram to the last verdict (None: no lock). */
static PyObject *serve(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "serve(fd, scratch, holder, keep_mask, limit, block, packet_type, lock)");
        return NULL;
    }
    int fd = (int)PyLong_AsLong(args[0]);
    PyObject *holder = args[2];
    uint32_t keep_mask = (uint32_t)PyLong_AsUnsignedLong(args[3]);
    long limit = PyLong_AsLong(args[4]);
    int block = PyObject_IsTrue(args[5]);
    PyObject *packet_type = args[6];
    PyObject *lock = args[7] == Py_None ? NULL : args[7];
    if (PyErr_Occurred() || block < 0)
        return NULL;
    if (!PyList_Check(holder)) {
        PyErr_SetString(PyExc_TypeError, "holder: a list of one pick table");
        return NULL;
    }
    Py_buffer scratch;
    if (PyObject_GetBuffer(args[1], &scratch, PyBUF_WRITABLE) < 0)
        return NULL;
    size_t capacity = (size_t)scratch.len / RECV_SIZE;
    if (capacity < 1) {
        PyBuffer_Release(&scratch);
        PyErr_SetString(PyExc_ValueError, "scratch: at least one 4096-byte buffer");
        return NULL;
    }
    unsigned char *buffers = scratch.buf;
    Verdicts *v = PyMem_Malloc(sizeof(Verdicts));
    PyObject *leftovers = PyList_New(0);
    if (v == NULL || leftovers == NULL) {
        PyMem_Free(v);
        Py_XDECREF(leftovers);
        PyBuffer_Release(&scratch);
        return PyErr_NoMemory();
    }
    v->fd = fd;
    v->pending = 0;
    long datagrams = 0, decided = 0;
    double first_read = 0.0;
    ssize_t got;
    int error = 0, locked = 0;
    PyObject *table = NULL;

    /* The first datagram: the blocking reader's sleep (no poll before the read). */
    for (;;) {
        double started = now();
        if (block) {
            Py_BEGIN_ALLOW_THREADS
            got = recv(fd, buffers, RECV_SIZE, 0);
            error = errno;
            Py_END_ALLOW_THREADS
        } else {
            got = recv(fd, buffers, RECV_SIZE, MSG_DONTWAIT);
            error = errno;
        }
        first_read = now() - started;
        if (got >= 0)
            break;
        if (error == ENOBUFS)
            continue; /* overruns are the kernel's to count (fail-open) */
        if (error == EINTR && PyErr_CheckSignals() == 0)
            got = -1, error = EAGAIN; /* a handler ran (SIGTERM sets the forwarder's flag): let the caller look */
        if (error == EAGAIN || error == EWOULDBLOCK)
            goto done;
        if (!PyErr_Occurred()) {
            errno = error;
            PyErr_SetFromErrno(PyExc_OSError);
        }
        goto failed;
    }
    datagrams = 1;
    if (lock != NULL) {
        if (lock_call(lock, acquire_name) < 0)
            goto failed; /* (the datagram read is lost: its packet waits in the queue until the queue goes) */
        locked = 1;
    }
    /* Read under the lock, after the sleep: the table current now, which no change replaces before the batch ends. */
    if (PyList_GET_SIZE(holder) != 1 || !PyDict_Check(PyList_GET_ITEM(holder, 0))) {
        PyErr_SetString(PyExc_TypeError, "holder: a list of one pick table (a dict)");
        goto failed;
    }
    table = PyList_GET_ITEM(holder, 0);
    Py_INCREF(table);
    if (walk(v, table, keep_mask, packet_type, leftovers, buffers, (size_t)got, &decided) < 0)
        goto failed;
    /* Then everything waiting, up to `limit` datagrams, with recvmmsg. */
    struct mmsghdr messages[64];
    struct iovec vectors[64];
    while (datagrams < limit) {
        size_t want = (size_t)(limit - datagrams);
        if (want > capacity) want = capacity;
        if (want > 64) want = 64;
        for (size_t i = 0; i < want; i++) {
            vectors[i].iov_base = buffers + i * RECV_SIZE;
            vectors[i].iov_len = RECV_SIZE;
            memset(&messages[i].msg_hdr, 0, sizeof(messages[i].msg_hdr));
            messages[i].msg_hdr.msg_iov = &vectors[i];
            messages[i].msg_hdr.msg_iovlen = 1;
        }
        int count = recvmmsg(fd, messages, (unsigned)want, MSG_DONTWAIT, NULL);
        if (count < 0) {
            if (errno == ENOBUFS || errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            PyErr_SetFromErrno(PyExc_OSError);
            goto failed;
        }
        if (count == 0)
            break;
        for (int i = 0; i < count; i++)
            if (walk(v, table, keep_mask, packet_type, leftovers, buffers + i * RECV_SIZE, messages[i].msg_len,
                     &decided) < 0)
                goto failed;
        datagrams += count;
        if ((size_t)count < want)
            break;
    }
done:
    if (flush(v) < 0)
        goto failed;
    Py_XDECREF(table);
    if (locked && lock_call(lock, release_name) < 0) {
        locked = 0;
        table = NULL;
        goto failed;
    }
    PyMem_Free(v);
    PyBuffer_Release(&scratch);
    return Py_BuildValue("llNd", datagrams, decided, leftovers, first_read);
failed:
    if (v->pending) {
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        if (flush(v) < 0) /* what was decided still leaves; the first error is the one raised */
            PyErr_Clear();
        PyErr_Restore(type, value, traceback);
    }
    Py_XDECREF(table);
    if (locked)
        lock_call(lock, release_name);
    PyMem_Free(v);
    PyBuffer_Release(&scratch);
    Py_DECREF(leftovers);
    return NULL;
}

/* drain(counts) -> list of the counts, each then zeroed: in one step, so no batch lands between read and reset. */
static PyObject *drain(PyObject *self, PyObject *counts_object) {
    Py_buffer counts;
    if (PyObject_GetBuffer(counts_object, &counts, PyBUF_WRITABLE) < 0)
        return NULL;
    Py_ssize_t n = counts.len / 8;
    PyObject *out = PyList_New(n);
    if (out != NULL) {
        uint64_t *at = counts.buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *value = PyLong_FromUnsignedLongLong(at[i]);
            if (value == NULL) {
                Py_CLEAR(out);
                break;
            }
            PyList_SET_ITEM(out, i, value);
        }
        if (out != NULL) /* zeroed only once all are read: a failure leaves every count for the next drain */
            memset(at, 0, (size_t)n * 8);
    }
    PyBuffer_Release(&counts);
    return out;
}

/* flow_key(packet bytes) -> the pick-table key serve() looks up for it, or -1: the parser alone, for tests. */
static PyObject *key_of(PyObject *self, PyObject *data) {
    Py_buffer packet;
    if (PyObject_GetBuffer(data, &packet, PyBUF_SIMPLE) < 0)
        return NULL;
    long long key = flow_key(packet.buf, (size_t)packet.len);
    PyBuffer_Release(&packet);
    return PyLong_FromLongLong(key);
}

static PyMethodDef methods[] = {
    {"serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL, "Decide a batch of queued packets; see the module."},
    {"drain", drain, METH_O, "Read and zero a pick table entry's counts."},
    {"flow_key", key_of, METH_O, "The pick-table key of a packet (picks.key), or -1 when serve() leaves it to Python."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_nfqueue", NULL, -1, methods};

PyMODINIT_FUNC PyInit__nfqueue(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    rng_state = ((uint64_t)t.tv_nsec << 20) ^ (uint64_t)t.tv_sec ^ ((uint64_t)getpid() << 40) ^ 0x9E3779B97F4A7C15ULL;
    if (rng_state == 0)
        rng_state = 1;
    acquire_name = PyUnicode_InternFromString("acquire");
    release_name = PyUnicode_InternFromString("release");
    if (acquire_name == NULL || release_name == NULL)
        return NULL;
    return PyModule_Create(&module);
}
