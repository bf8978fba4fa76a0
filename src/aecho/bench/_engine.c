/* The closed-loop echo's steady state, in C: what one bench worker does per message.
 *
 * Python (aecho/bench/engine.py) opens the connections, sends the first messages, and
 * hands the connections' descriptors here while the run sends; it takes them back to
 * wait for the last replies and for anything out of the ordinary.  Per message this
 * does what BenchConn.data_received's inlined path does: read, compare every byte with
 * the reply expected (the payload sent: CONNID.SEQUENCE then the connection's filler),
 * record the latency in the same log-linear buckets as aecho.bench.histogram, and write
 * the next message, timed from just before its write.  Messages made in one pass over
 * the ready descriptors are written together at its end, as Tally.flush does.
 *
 * A connection leaves the engine (a "hand-back") on end of file, a socket error, a byte
 * that differs, or a reply owed for longer than the timeout; Python counts it.  Nothing
 * here allocates per message.  run() releases the GIL, so Python can call it in a thread
 * of its own and keep its event loop turning; wake() makes it return at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { ACTIVE = 0, GONE = 1 };
enum { BACK_EOF = 1, BACK_ERROR = 2, BACK_MISMATCH = 3, BACK_TIMEOUT = 4 };

#define MAX_EVENTS 512
#define READ_SIZE 262144
#define HEX_DIGITS 16
#define WAKE_TOKEN UINT64_MAX /* epoll data of the wake-up eventfd */

typedef struct {
    int fd;
    int state;
    int back_kind;      /* why it was handed back */
    int back_errno;
    int want_out;       /* EPOLLOUT registered: a write is under way */
    uint32_t n_out;     /* replies owed */
    uint32_t head;      /* ring index of the oldest owed reply's due time */
    uint32_t to_queue;  /* messages to make at the end of this pass */
    uint64_t seq;       /* messages made so far: the next one's sequence number */
    uint64_t unsent;    /* the first message not yet wholly written */
    uint64_t exp_seq;   /* the message `exp` holds */
    uint64_t out_seq;   /* the message `out` holds */
    size_t off;         /* bytes of the oldest owed reply received */
    size_t wpos;        /* bytes of message `unsent` written */
    int64_t *dues;      /* ring of `cap` due times (CLOCK_MONOTONIC ns) */
    unsigned char *exp; /* the oldest owed reply, as expected */
    unsigned char *out; /* the message being written */
} Conn;

typedef struct {
    PyObject_HEAD
    int epfd;
    int wakefd;         /* written by wake(): run() returns at once */
    int running;        /* run() is under way, in some thread */
    Py_ssize_t n;
    Py_ssize_t size;    /* bytes per message */
    Py_ssize_t hex_at;  /* where the sequence's 16 hex digits sit in a message */
    uint32_t cap;
    int sub_bits;
    int64_t highest;
    Py_ssize_t buckets;
    Conn *conns;
    unsigned char *mem; /* every connection's exp and out buffers */
    int64_t *dues;
    unsigned char *buf; /* what one read takes */
    uint64_t *counts;
    uint64_t total_ns;
    int64_t max;
    int64_t low;        /* -1: nothing recorded since the last take */
    Py_ssize_t *sends;  /* connections with messages to make in this pass */
    Py_ssize_t *backs;  /* connections handed back in this run */
    Py_ssize_t n_backs;
} Engine;

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void put_hex(unsigned char *p, uint64_t v) {
    static const char digits[] = "0123456789abcdef";
    for (int i = HEX_DIGITS - 1; i >= 0; i--) {
        p[i] = (unsigned char)digits[v & 15];
        v >>= 4;
    }
}

/* aecho.bench.histogram.bucket_index, for 0 <= v <= HIGHEST_NS */
static inline Py_ssize_t bucket_of(int64_t v, int sub_bits) {
    int bits = v ? 64 - __builtin_clzll((uint64_t)v) : 0;
    int shift = bits - (sub_bits + 1);
    if (shift <= 0) return (Py_ssize_t)v;
    return ((Py_ssize_t)shift << sub_bits) + (Py_ssize_t)(v >> shift);
}

static inline void record(Engine *e, int64_t d) {
    if (d < 0) d = 0;
    if (d > e->highest) d = e->highest;
    e->counts[bucket_of(d, e->sub_bits)] += 1;
    if (d > e->max) e->max = d;
    if (e->low < 0 || d < e->low) e->low = d;
    e->total_ns += (uint64_t)d;
}

static void hand_back(Engine *e, Py_ssize_t i, int kind, int err) {
    Conn *c = &e->conns[i];
    if (c->state != ACTIVE) return;
    c->state = GONE;
    c->back_kind = kind;
    c->back_errno = err;
    epoll_ctl(e->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    e->backs[e->n_backs++] = i;
}

static void watch_out(Engine *e, Py_ssize_t i, int on) {
    Conn *c = &e->conns[i];
    if (c->want_out == on) return;
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.u64 = (uint64_t)i};
    if (epoll_ctl(e->epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
        hand_back(e, i, BACK_ERROR, errno);
        return;
    }
    c->want_out = on;
}

/* Write what is made and not yet written, until the socket would block. */
static void write_some(Engine *e, Py_ssize_t i) {
    Conn *c = &e->conns[i];
    while (c->state == ACTIVE && c->unsent < c->seq) {
        if (c->out_seq != c->unsent) {
            put_hex(c->out + e->hex_at, c->unsent);
            c->out_seq = c->unsent;
        }
        ssize_t w = send(c->fd, c->out + c->wpos, (size_t)e->size - c->wpos, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            hand_back(e, i, BACK_ERROR, errno);
            return;
        }
        c->wpos += (size_t)w;
        if (c->wpos < (size_t)e->size) break; /* the socket's buffer is full */
        c->wpos = 0;
        c->unsent += 1;
    }
    if (c->state == ACTIVE) watch_out(e, i, c->unsent < c->seq);
}

/* One read; every reply it completes is timed and owes the connection a new message. */
static void read_some(Engine *e, Py_ssize_t i, int64_t measure_ns) {
    Conn *c = &e->conns[i];
    ssize_t r = recv(c->fd, e->buf, READ_SIZE, 0);
    if (r == 0) {
        hand_back(e, i, BACK_EOF, 0);
        return;
    }
    if (r < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            hand_back(e, i, BACK_ERROR, errno);
        return;
    }
    int64_t now = now_ns();
    size_t size = (size_t)e->size;
    size_t pos = 0;
    while (pos < (size_t)r) {
        if (!c->n_out) { /* bytes nobody asked for */
            hand_back(e, i, BACK_MISMATCH, 0);
            return;
        }
        uint64_t oldest = c->seq - c->n_out;
        if (c->exp_seq != oldest) {
            put_hex(c->exp + e->hex_at, oldest);
            c->exp_seq = oldest;
        }
        size_t take = size - c->off;
        if (take > (size_t)r - pos) take = (size_t)r - pos;
        if (memcmp(e->buf + pos, c->exp + c->off, take) != 0) {
            hand_back(e, i, BACK_MISMATCH, 0);
            return;
        }
        pos += take;
        c->off += take;
        if (c->off == size) {
            int64_t due = c->dues[c->head];
            c->off = 0;
            c->head = (c->head + 1) % e->cap;
            c->n_out -= 1;
            if (due >= measure_ns) record(e, now - due);
            if (!c->to_queue++) e->sends[0]++, e->sends[e->sends[0]] = i;
        }
    }
}

static int Engine_init(Engine *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fds", "templates", "hex_at", "capacity", "sub_bits",
                             "highest_ns", "buckets", NULL};
    PyObject *fds, *templates;
    Py_ssize_t hex_at, capacity, buckets;
    int sub_bits;
    long long highest;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOnninn", kwlist, &fds, &templates, &hex_at,
                                     &capacity, &sub_bits, &highest, &buckets))
        return -1;
    if (self->conns) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is already set up");
        return -1;
    }
    fds = PySequence_Fast(fds, "fds must be a sequence");
    if (!fds) return -1;
    templates = PySequence_Fast(templates, "templates must be a sequence");
    if (!templates) {
        Py_DECREF(fds);
        return -1;
    }
    int ok = -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fds);
    if (n < 1 || n != PySequence_Fast_GET_SIZE(templates) || capacity < 1 || buckets < 1 ||
        sub_bits < 0 || sub_bits > 16 || highest < 0 || capacity > 1 << 20) {
        PyErr_SetString(PyExc_ValueError, "bad engine parameters");
        goto done;
    }
    PyObject *first = PySequence_Fast_GET_ITEM(templates, 0);
    if (!PyBytes_Check(first)) {
        PyErr_SetString(PyExc_TypeError, "templates must be bytes");
        goto done;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(first);
    if (hex_at < 0 || hex_at + HEX_DIGITS > size ||
        bucket_of((int64_t)highest, sub_bits) >= buckets) {
        PyErr_SetString(PyExc_ValueError, "bad engine parameters");
        goto done;
    }
    self->n = n;
    self->size = size;
    self->hex_at = hex_at;
    self->cap = (uint32_t)capacity;
    self->sub_bits = sub_bits;
    self->highest = (int64_t)highest;
    self->buckets = buckets;
    self->low = -1;
    self->conns = PyMem_Calloc((size_t)n, sizeof(Conn));
    self->mem = PyMem_Malloc((size_t)n * 2 * (size_t)size);
    self->dues = PyMem_Calloc((size_t)n * (size_t)capacity, sizeof(int64_t));
    self->buf = PyMem_Malloc(READ_SIZE);
    self->counts = PyMem_Calloc((size_t)buckets, sizeof(uint64_t));
    self->sends = PyMem_Calloc((size_t)n + 1, sizeof(Py_ssize_t));
    self->backs = PyMem_Calloc((size_t)n, sizeof(Py_ssize_t));
    if (!self->conns || !self->mem || !self->dues || !self->buf || !self->counts ||
        !self->sends || !self->backs) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *fd_obj = PySequence_Fast_GET_ITEM(fds, i);
        PyObject *t = PySequence_Fast_GET_ITEM(templates, i);
        long fd = PyLong_AsLong(fd_obj);
        if (fd == -1 && PyErr_Occurred()) goto done;
        if (!PyBytes_Check(t) || PyBytes_GET_SIZE(t) != size || fd < 0 || fd > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "every template must be bytes of one size");
            goto done;
        }
        Conn *c = &self->conns[i];
        c->fd = (int)fd;
        c->state = GONE; /* until load() */
        c->exp = self->mem + (size_t)i * 2 * (size_t)size;
        c->out = c->exp + size;
        memcpy(c->exp, PyBytes_AS_STRING(t), (size_t)size);
        memcpy(c->out, PyBytes_AS_STRING(t), (size_t)size);
        c->exp_seq = c->out_seq = UINT64_MAX;
        c->dues = self->dues + (size_t)i * (size_t)capacity;
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    self->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event wake = {.events = EPOLLIN, .data.u64 = WAKE_TOKEN};
    if (self->epfd < 0 || self->wakefd < 0 ||
        epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->wakefd, &wake) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    ok = 0;
done:
    Py_DECREF(fds);
    Py_DECREF(templates);
    return ok;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    (void)args;
    (void)kwds;
    Engine *self = (Engine *)type->tp_alloc(type, 0);
    if (self) self->epfd = self->wakefd = -1;
    return (PyObject *)self;
}

static void Engine_dealloc(Engine *self) {
    if (self->epfd >= 0) close(self->epfd);
    if (self->wakefd >= 0) close(self->wakefd);
    PyMem_Free(self->conns);
    PyMem_Free(self->mem);
    PyMem_Free(self->dues);
    PyMem_Free(self->buf);
    PyMem_Free(self->counts);
    PyMem_Free(self->sends);
    PyMem_Free(self->backs);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ready(Engine *self) {
    if (self->epfd < 0 || !self->conns) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is closed");
        return 0;
    }
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is running");
        return 0;
    }
    return 1;
}

static int conn_index(Engine *self, Py_ssize_t i) {
    if (i < 0 || i >= self->n) {
        PyErr_SetString(PyExc_IndexError, "no such connection");
        return 0;
    }
    return 1;
}

/* load(i, seq, off, dues): connection i has made `seq` messages, all written; the
 * replies to the last len(dues) are owed, `off` bytes of the oldest already in. */
static PyObject *Engine_load(Engine *self, PyObject *args) {
    Py_ssize_t i, off;
    unsigned long long seq;
    PyObject *dues;
    if (!PyArg_ParseTuple(args, "nKnO", &i, &seq, &off, &dues)) return NULL;
    if (!ready(self) || !conn_index(self, i)) return NULL;
    dues = PySequence_Fast(dues, "dues must be a sequence");
    if (!dues) return NULL;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(dues);
    Conn *c = &self->conns[i];
    if (k > (Py_ssize_t)self->cap || (uint64_t)k > seq || off < 0 || off >= self->size ||
        (off && !k) || c->state == ACTIVE) {
        Py_DECREF(dues);
        PyErr_SetString(PyExc_ValueError, "bad connection state");
        return NULL;
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        long long due = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(dues, j));
        if (due == -1 && PyErr_Occurred()) {
            Py_DECREF(dues);
            return NULL;
        }
        c->dues[j] = (int64_t)due;
    }
    Py_DECREF(dues);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)i};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    c->state = ACTIVE;
    c->back_kind = c->back_errno = c->want_out = 0;
    c->n_out = (uint32_t)k;
    c->head = 0;
    c->to_queue = 0;
    c->seq = c->unsent = (uint64_t)seq;
    c->off = (size_t)off;
    c->wpos = 0;
    Py_RETURN_NONE;
}

/* run(until_ns, measure_ns, timeout_ns) -> (woken, [(i, kind, errno), ...])
 * Serves the loaded connections until CLOCK_MONOTONIC reaches until_ns or wake() is
 * called; replies to messages due before measure_ns are not recorded. */
static PyObject *Engine_run(Engine *self, PyObject *args) {
    long long until, measure, timeout;
    if (!PyArg_ParseTuple(args, "LLL", &until, &measure, &timeout)) return NULL;
    if (!ready(self)) return NULL;
    int woken = 0, failed_errno = 0;
    self->n_backs = 0;
    self->running = 1;
    Py_BEGIN_ALLOW_THREADS
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int64_t now = now_ns();
        if (now >= until) break;
        int64_t wait_ms = (until - now + 999999) / 1000000;
        int n = epoll_wait(self->epfd, events, MAX_EVENTS, wait_ms > 1000 ? 1000 : (int)wait_ms);
        if (n < 0) {
            if (errno == EINTR) continue; /* a signal, for the main thread to see */
            failed_errno = errno;
            break;
        }
        self->sends[0] = 0;
        for (int k = 0; k < n; k++) {
            if (events[k].data.u64 == WAKE_TOKEN) {
                uint64_t count;
                if (read(self->wakefd, &count, sizeof count) < 0) { /* already drained */ }
                woken = 1;
                continue;
            }
            Py_ssize_t i = (Py_ssize_t)events[k].data.u64;
            Conn *c = &self->conns[i];
            if (c->state != ACTIVE) continue;
            if (events[k].events & EPOLLOUT) write_some(self, i);
            if (c->state == ACTIVE && events[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                read_some(self, i, (int64_t)measure);
        }
        Py_ssize_t todo = self->sends[0];
        for (Py_ssize_t s = 1; s <= todo; s++) {
            Py_ssize_t i = self->sends[s];
            Conn *c = &self->conns[i];
            uint32_t q = c->to_queue;
            c->to_queue = 0;
            if (c->state != ACTIVE) continue;
            int64_t sent_at = now_ns();
            for (; q; q--) {
                c->dues[(c->head + c->n_out) % self->cap] = sent_at;
                c->n_out += 1;
                c->seq += 1;
            }
            write_some(self, i);
        }
        if (woken) break;
    }
    int64_t now = now_ns();
    for (Py_ssize_t i = 0; i < self->n; i++) {
        Conn *c = &self->conns[i];
        if (c->state == ACTIVE && c->n_out && now - c->dues[c->head] > (int64_t)timeout)
            hand_back(self, i, BACK_TIMEOUT, 0);
    }
    Py_END_ALLOW_THREADS
    self->running = 0;
    if (failed_errno) {
        errno = failed_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *backs = PyList_New(self->n_backs);
    if (!backs) return NULL;
    for (Py_ssize_t b = 0; b < self->n_backs; b++) {
        Conn *c = &self->conns[self->backs[b]];
        PyObject *item = Py_BuildValue("(nii)", self->backs[b], c->back_kind, c->back_errno);
        if (!item) {
            Py_DECREF(backs);
            return NULL;
        }
        PyList_SET_ITEM(backs, b, item);
    }
    return Py_BuildValue("(NN)", PyBool_FromLong(woken), backs);
}

/* take() -> ({bucket: count}, total_ns, max, low): what was recorded since the last
 * take (low is -1 when nothing was), and start afresh. */
static PyObject *Engine_take(Engine *self, PyObject *unused) {
    (void)unused;
    if (!self->counts) return PyErr_Format(PyExc_RuntimeError, "the engine is not set up");
    if (self->running) return PyErr_Format(PyExc_RuntimeError, "the engine is running");
    PyObject *fresh = PyDict_New();
    if (!fresh) return NULL;
    for (Py_ssize_t b = 0; b < self->buckets; b++) {
        if (!self->counts[b]) continue;
        PyObject *k = PyLong_FromSsize_t(b);
        PyObject *v = PyLong_FromUnsignedLongLong(self->counts[b]);
        if (!k || !v || PyDict_SetItem(fresh, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            Py_DECREF(fresh);
            return NULL;
        }
        Py_DECREF(k);
        Py_DECREF(v);
        self->counts[b] = 0;
    }
    PyObject *out = Py_BuildValue("(NKLL)", fresh, (unsigned long long)self->total_ns,
                                  (long long)self->max, (long long)self->low);
    self->total_ns = 0;
    self->max = 0;
    self->low = -1;
    return out;
}

/* state(i) -> (seq, off, dues, unsent, wpos): where connection i stands, its owed
 * replies' due times oldest first; messages unsent..seq-1 are not wholly written,
 * wpos bytes of the first of them are. */
static PyObject *Engine_state(Engine *self, PyObject *args) {
    Py_ssize_t i;
    if (!PyArg_ParseTuple(args, "n", &i)) return NULL;
    if (!self->conns || !conn_index(self, i)) return NULL;
    if (self->running) return PyErr_Format(PyExc_RuntimeError, "the engine is running");
    Conn *c = &self->conns[i];
    PyObject *dues = PyList_New(c->n_out);
    if (!dues) return NULL;
    for (uint32_t j = 0; j < c->n_out; j++) {
        PyObject *d = PyLong_FromLongLong(c->dues[(c->head + j) % self->cap]);
        if (!d) {
            Py_DECREF(dues);
            return NULL;
        }
        PyList_SET_ITEM(dues, j, d);
    }
    return Py_BuildValue("(KnNKn)", (unsigned long long)c->seq, (Py_ssize_t)c->off, dues,
                         (unsigned long long)c->unsent, (Py_ssize_t)c->wpos);
}

/* release(i): connection i leaves the engine (Python serves it from here on). */
static PyObject *Engine_release(Engine *self, PyObject *args) {
    Py_ssize_t i;
    if (!PyArg_ParseTuple(args, "n", &i)) return NULL;
    if (!ready(self) || !conn_index(self, i)) return NULL;
    Conn *c = &self->conns[i];
    if (c->state == ACTIVE) {
        c->state = GONE;
        epoll_ctl(self->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    }
    Py_RETURN_NONE;
}

/* wake(): a run() under way returns now (the next one, if none is). Any thread. */
static PyObject *Engine_wake(Engine *self, PyObject *unused) {
    (void)unused;
    uint64_t one = 1;
    if (self->wakefd >= 0 && write(self->wakefd, &one, sizeof one) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *Engine_close(Engine *self, PyObject *unused) {
    (void)unused;
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is running");
        return NULL;
    }
    if (self->epfd >= 0) {
        close(self->epfd);
        self->epfd = -1;
    }
    Py_RETURN_NONE;
}

static PyObject *engine_bucket(PyObject *module, PyObject *args) {
    (void)module;
    long long v;
    int sub_bits;
    if (!PyArg_ParseTuple(args, "Li", &v, &sub_bits)) return NULL;
    if (v < 0 || sub_bits < 0 || sub_bits > 16) {
        PyErr_SetString(PyExc_ValueError, "bad value");
        return NULL;
    }
    return PyLong_FromSsize_t(bucket_of((int64_t)v, sub_bits));
}

static PyMethodDef Engine_methods[] = {
    {"load", (PyCFunction)Engine_load, METH_VARARGS, "Take a connection over."},
    {"run", (PyCFunction)Engine_run, METH_VARARGS, "Serve until a time or a signal."},
    {"take", (PyCFunction)Engine_take, METH_NOARGS, "The latencies recorded since last."},
    {"state", (PyCFunction)Engine_state, METH_VARARGS, "Where a connection stands."},
    {"release", (PyCFunction)Engine_release, METH_VARARGS, "Give a connection back."},
    {"wake", (PyCFunction)Engine_wake, METH_NOARGS, "Make run() return now."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "Close the engine's epoll."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "aecho.bench._engine.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A closed-loop echo load on many connections, verified and timed.",
    .tp_new = Engine_new,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

static PyMethodDef module_methods[] = {
    {"bucket", engine_bucket, METH_VARARGS, "The histogram bucket of a value."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT, "_engine", "bench's per-message loop, in C.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__engine(void) {
    if (PyType_Ready(&EngineType) < 0) return NULL;
    PyObject *m = PyModule_Create(&engine_module);
    if (!m) return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddIntConstant(m, "EOF", BACK_EOF) < 0 ||
        PyModule_AddIntConstant(m, "ERROR", BACK_ERROR) < 0 ||
        PyModule_AddIntConstant(m, "MISMATCH", BACK_MISMATCH) < 0 ||
        PyModule_AddIntConstant(m, "TIMEOUT", BACK_TIMEOUT) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
