/*
 * ledgerlog.validator._cstate -- the validator's hot state, kept compactly in C.
 *
 * Optional: ledgerlog.validator uses it when it imports, and otherwise runs the
 * pure-Python reference implementation, which decides identically (tests/test_cstate.py
 * checks outcomes, digests and snapshots of both on random workloads).  Only the CPython
 * C API is used.  Transactions are still decoded by msgspec: validate_batch() calls the
 * decoder it was configured with, so both implementations see the same objects.
 *
 * Layout (why it is fast): a Python dict of str -> int costs four or five cache misses
 * per lookup once it outgrows the caches (index, entry, key object, value object).  Here:
 *
 *   Table  open addressing, linear probing, power-of-two capacity, backward-shift
 *          deletion (no tombstones), 32-byte slots {seq, tag, meta, key}.  A key of up
 *          to 16 UTF-8 bytes lives inside its slot, so a lookup is one cache line; a
 *          longer key is referenced in its Log's arena.  Keys are always compared
 *          byte for byte: the hash only chooses slots, so no hash collision can change
 *          a decision, and the hash may be Python's own (per-process randomized, cached
 *          in the str, resistant to flooding).  Nothing ever iterates a table on the
 *          decision path.
 *   Log    FIFO ring of 32-byte entries {seq, tag, flags, off, len} plus an arena of the
 *          keys' UTF-8 bytes in the same order: the write history (grouped per commit,
 *          exactly as the Python history deque) and the committed-txn-id history.
 *          Pruning walks it sequentially and deletes a table entry only if its seq
 *          equals the history entry's (the Python rule).  Snapshots are produced from it.
 *
 * An external (long) key's slot references the arena bytes of the newest history entry
 * that set the slot.  That entry is popped only by pruning, which then deletes the slot
 * (its seq equals the entry's), so a slot never outlives the bytes it references.
 *
 * Txn ids are keyed by client_id's UTF-8 bytes followed by client_seq as 8 big-endian
 * bytes (client_seq is a msgpack integer >= 0, so it fits).
 *
 * The digest is BLAKE2b with a 16-byte output (RFC 7693), the same function as
 * hashlib.blake2b(..., digest_size=16), implemented below so a digest costs no Python
 * call and no concatenation.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

/* ------------------------------------------------------------------------------------ */
/* BLAKE2b (RFC 7693), unkeyed, streaming                                                */
/* ------------------------------------------------------------------------------------ */

typedef struct {
    uint64_t h[8];
    uint64_t t0, t1;
    unsigned char buf[128];
    size_t c;
    size_t outlen;
} B2;

static const uint64_t B2_IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
    0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
    0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};

static const uint8_t B2_SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

static inline uint64_t rotr64(uint64_t x, unsigned n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64le(const unsigned char *p)
{
    return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) |
           ((uint64_t)p[3] << 24) | ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40) |
           ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
}

#define B2_G(a, b, c, d, x, y)          \
    do {                                \
        v[a] = v[a] + v[b] + (x);       \
        v[d] = rotr64(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d];             \
        v[b] = rotr64(v[b] ^ v[c], 24); \
        v[a] = v[a] + v[b] + (y);       \
        v[d] = rotr64(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d];             \
        v[b] = rotr64(v[b] ^ v[c], 63); \
    } while (0)

static void b2_compress(B2 *S, int last)
{
    uint64_t v[16], m[16];
    for (int i = 0; i < 8; i++) {
        v[i] = S->h[i];
        v[i + 8] = B2_IV[i];
    }
    v[12] ^= S->t0;
    v[13] ^= S->t1;
    if (last)
        v[14] = ~v[14];
    for (int i = 0; i < 16; i++)
        m[i] = load64le(S->buf + 8 * i);
    /* Rounds unrolled so the message schedule is constant: twice as fast as a loop. */
#define B2_ROUND(r)                                                      \
    do {                                                                 \
        B2_G(0, 4, 8, 12, m[B2_SIGMA[r][0]], m[B2_SIGMA[r][1]]);         \
        B2_G(1, 5, 9, 13, m[B2_SIGMA[r][2]], m[B2_SIGMA[r][3]]);         \
        B2_G(2, 6, 10, 14, m[B2_SIGMA[r][4]], m[B2_SIGMA[r][5]]);        \
        B2_G(3, 7, 11, 15, m[B2_SIGMA[r][6]], m[B2_SIGMA[r][7]]);        \
        B2_G(0, 5, 10, 15, m[B2_SIGMA[r][8]], m[B2_SIGMA[r][9]]);        \
        B2_G(1, 6, 11, 12, m[B2_SIGMA[r][10]], m[B2_SIGMA[r][11]]);      \
        B2_G(2, 7, 8, 13, m[B2_SIGMA[r][12]], m[B2_SIGMA[r][13]]);       \
        B2_G(3, 4, 9, 14, m[B2_SIGMA[r][14]], m[B2_SIGMA[r][15]]);       \
    } while (0)
    B2_ROUND(0);
    B2_ROUND(1);
    B2_ROUND(2);
    B2_ROUND(3);
    B2_ROUND(4);
    B2_ROUND(5);
    B2_ROUND(6);
    B2_ROUND(7);
    B2_ROUND(8);
    B2_ROUND(9);
    B2_ROUND(10);
    B2_ROUND(11);
#undef B2_ROUND
    for (int i = 0; i < 8; i++)
        S->h[i] ^= v[i] ^ v[i + 8];
}

static void b2_init(B2 *S, size_t outlen)
{
    for (int i = 0; i < 8; i++)
        S->h[i] = B2_IV[i];
    S->h[0] ^= 0x01010000ULL ^ (uint64_t)outlen;
    S->t0 = S->t1 = 0;
    S->c = 0;
    S->outlen = outlen;
}

static void b2_update(B2 *S, const unsigned char *in, size_t n)
{
    while (n > 0) {
        if (S->c == 128) { /* a full block, and more input follows: not the last one */
            S->t0 += 128;
            if (S->t0 < 128)
                S->t1++;
            b2_compress(S, 0);
            S->c = 0;
        }
        size_t k = 128 - S->c;
        if (k > n)
            k = n;
        memcpy(S->buf + S->c, in, k);
        S->c += k;
        in += k;
        n -= k;
    }
}

static void b2_final(B2 *S, unsigned char *out)
{
    S->t0 += S->c;
    if (S->t0 < S->c)
        S->t1++;
    memset(S->buf + S->c, 0, 128 - S->c);
    b2_compress(S, 1);
    for (size_t i = 0; i < S->outlen; i++)
        out[i] = (unsigned char)(S->h[i >> 3] >> (8 * (i & 7)));
}

/* ------------------------------------------------------------------------------------ */
/* Log: FIFO ring of entries + arena of key bytes                                        */
/* ------------------------------------------------------------------------------------ */

#define F_GROUP 1u /* first entry of a history group (one committed txn's writes) */
#define F_EMPTY 2u /* a group without keys (only from a restored snapshot) */

typedef struct {
    uint64_t seq;
    uint32_t tag;
    uint32_t flags;
    uint64_t off; /* logical arena offset of the key bytes */
    uint64_t len;
} Entry;

typedef struct {
    Entry *ring;
    size_t rmask; /* ring capacity - 1 (capacity is a power of two) */
    size_t head;
    size_t count;
    char *arena;
    size_t acap;
    uint64_t abase; /* logical offset of arena[0] */
    uint64_t ahead; /* logical offset of the first live byte */
    uint64_t atail; /* logical offset just past the last live byte */
} Log;

static inline const char *log_ptr(const Log *lg, uint64_t off)
{
    return lg->arena + (size_t)(off - lg->abase);
}

static int log_init(Log *lg)
{
    memset(lg, 0, sizeof(*lg));
    lg->ring = PyMem_Malloc(16 * sizeof(Entry));
    lg->acap = 256;
    lg->arena = PyMem_Malloc(lg->acap);
    if (!lg->ring || !lg->arena) {
        PyMem_Free(lg->ring);
        PyMem_Free(lg->arena);
        lg->ring = NULL;
        lg->arena = NULL;
        PyErr_NoMemory();
        return -1;
    }
    lg->rmask = 15;
    return 0;
}

static void log_free(Log *lg)
{
    PyMem_Free(lg->ring);
    PyMem_Free(lg->arena);
    lg->ring = NULL;
    lg->arena = NULL;
}

/* Append an entry; its key bytes (p, n) are copied to the arena. */
static int log_push(Log *lg, uint64_t seq, uint32_t tag, uint32_t flags, const char *p,
                    size_t n, uint64_t *off_out)
{
    if (lg->count > lg->rmask) {
        size_t cap = lg->rmask + 1;
        if (cap > (PY_SSIZE_T_MAX / sizeof(Entry)) / 2) {
            PyErr_NoMemory();
            return -1;
        }
        Entry *r = PyMem_Malloc(2 * cap * sizeof(Entry));
        if (!r) {
            PyErr_NoMemory();
            return -1;
        }
        size_t first = cap - lg->head; /* entries from head to the end of the old ring */
        memcpy(r, lg->ring + lg->head, first * sizeof(Entry));
        memcpy(r + first, lg->ring, lg->head * sizeof(Entry));
        PyMem_Free(lg->ring);
        lg->ring = r;
        lg->head = 0;
        lg->rmask = 2 * cap - 1;
    }
    if ((size_t)(lg->atail - lg->abase) + n > lg->acap) {
        size_t live = (size_t)(lg->atail - lg->ahead);
        if (n > (size_t)PY_SSIZE_T_MAX / 4 - live) {
            PyErr_NoMemory();
            return -1;
        }
        if (live + n <= lg->acap / 2) {
            memmove(lg->arena, lg->arena + (size_t)(lg->ahead - lg->abase), live);
        }
        else {
            size_t cap = lg->acap;
            while (cap < 2 * (live + n))
                cap *= 2;
            char *a = PyMem_Malloc(cap);
            if (!a) {
                PyErr_NoMemory();
                return -1;
            }
            memcpy(a, lg->arena + (size_t)(lg->ahead - lg->abase), live);
            PyMem_Free(lg->arena);
            lg->arena = a;
            lg->acap = cap;
        }
        lg->abase = lg->ahead;
    }
    if (n)
        memcpy(lg->arena + (size_t)(lg->atail - lg->abase), p, n);
    Entry *e = &lg->ring[(lg->head + lg->count) & lg->rmask];
    e->seq = seq;
    e->tag = tag;
    e->flags = flags;
    e->off = lg->atail;
    e->len = n;
    lg->atail += n;
    lg->count++;
    *off_out = e->off;
    return 0;
}

static inline Entry *log_front(Log *lg) { return &lg->ring[lg->head]; }

static inline void log_pop(Log *lg)
{
    Entry *e = &lg->ring[lg->head];
    lg->ahead = e->off + e->len;
    lg->head = (lg->head + 1) & lg->rmask;
    lg->count--;
}

static inline Entry *log_at(Log *lg, size_t i) { return &lg->ring[(lg->head + i) & lg->rmask]; }

/* ------------------------------------------------------------------------------------ */
/* Table: key bytes -> seq, open addressing                                              */
/* ------------------------------------------------------------------------------------ */

#define INLINE_MAX 16
#define META_USED 0x80000000u
#define META_EXT 0x7fffffffu /* low bits of meta for a key kept in the arena */
#ifndef LOAD_NUM
#define LOAD_NUM 3 /* grow when count would pass 3/4 of the capacity */
#define LOAD_DEN 4
#endif

typedef struct {
    uint64_t seq;
    uint32_t tag;  /* folded hash; home slot = tag & mask */
    uint32_t meta; /* META_USED | (key length if inline, else META_EXT) */
    union {
        unsigned char in[INLINE_MAX];
        struct {
            uint64_t off; /* logical offset in the Log's arena */
            uint64_t len;
        } ext;
    } k;
} Slot;

typedef struct {
    Slot *slots;
    size_t mask;
    size_t count;
} Table;

static int table_init(Table *t, size_t cap)
{
    t->slots = PyMem_Calloc(cap, sizeof(Slot));
    if (!t->slots) {
        PyErr_NoMemory();
        return -1;
    }
    t->mask = cap - 1;
    t->count = 0;
    return 0;
}

static void table_free(Table *t)
{
    PyMem_Free(t->slots);
    t->slots = NULL;
}

static inline int slot_eq(const Slot *s, const Log *lg, uint32_t tag, const char *p, size_t n)
{
    if (s->tag != tag)
        return 0;
    uint32_t m = s->meta & ~META_USED;
    if (n <= INLINE_MAX)
        return m == n && memcmp(s->k.in, p, n) == 0;
    return m == META_EXT && s->k.ext.len == n && memcmp(log_ptr(lg, s->k.ext.off), p, n) == 0;
}

/* Index of the key's slot, or -1 with *ins set to the empty slot where it would go. */
static inline Py_ssize_t table_find(const Table *t, const Log *lg, uint32_t tag, const char *p,
                                    size_t n, size_t *ins)
{
    size_t i = tag & t->mask;
    for (;;) {
        const Slot *s = &t->slots[i];
        if (!(s->meta & META_USED)) {
            if (ins)
                *ins = i;
            return -1;
        }
        if (slot_eq(s, lg, tag, p, n))
            return (Py_ssize_t)i;
        i = (i + 1) & t->mask;
    }
}

/* Make room for one more key (call before table_find when inserting). */
static int table_reserve(Table *t)
{
    size_t cap = t->mask + 1;
    if ((t->count + 1) * LOAD_DEN <= cap * LOAD_NUM)
        return 0;
    if (cap > (PY_SSIZE_T_MAX / sizeof(Slot)) / 2) {
        PyErr_NoMemory();
        return -1;
    }
    size_t ncap = cap * 2, nmask = ncap - 1;
    Slot *ns = PyMem_Calloc(ncap, sizeof(Slot));
    if (!ns) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < cap; i++) {
        Slot *s = &t->slots[i];
        if (s->meta & META_USED) {
            size_t j = s->tag & nmask;
            while (ns[j].meta & META_USED)
                j = (j + 1) & nmask;
            ns[j] = *s;
        }
    }
    PyMem_Free(t->slots);
    t->slots = ns;
    t->mask = nmask;
    return 0;
}

/* Store seq for a key at slot i, found or (via *ins) empty; off: the key's arena bytes
   in its newest history entry (only kept for keys longer than INLINE_MAX). */
static inline void table_store(Table *t, size_t i, int found, uint32_t tag, const char *p,
                               size_t n, uint64_t seq, uint64_t off)
{
    Slot *s = &t->slots[i];
    s->seq = seq;
    if (found) {
        if (n > INLINE_MAX)
            s->k.ext.off = off;
        return;
    }
    s->tag = tag;
    if (n <= INLINE_MAX) {
        s->meta = META_USED | (uint32_t)n;
        memset(s->k.in, 0, INLINE_MAX);
        if (n)
            memcpy(s->k.in, p, n);
    }
    else {
        s->meta = META_USED | META_EXT;
        s->k.ext.off = off;
        s->k.ext.len = n;
    }
    t->count++;
}

/* Delete slot i by shifting later members of its probe run back (no tombstones). */
static void table_delete(Table *t, size_t i)
{
    size_t mask = t->mask, j = i;
    for (;;) {
        j = (j + 1) & mask;
        Slot *s = &t->slots[j];
        if (!(s->meta & META_USED))
            break;
        size_t home = s->tag & mask;
        /* s may fill the hole at i unless its home lies cyclically in (i, j]. */
        if (((j - home) & mask) >= ((j - i) & mask)) {
            t->slots[i] = *s;
            i = j;
        }
    }
    t->slots[i].meta = 0;
    t->count--;
}

static inline void table_prefetch(const Table *t, uint32_t tag)
{
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(&t->slots[tag & t->mask]);
#else
    (void)t;
    (void)tag;
#endif
}

static inline const char *slot_key(const Slot *s, const Log *lg, size_t *n)
{
    uint32_t m = s->meta & ~META_USED;
    if (m == META_EXT) {
        *n = (size_t)s->k.ext.len;
        return log_ptr(lg, s->k.ext.off);
    }
    *n = m;
    return (const char *)s->k.in;
}

/* ------------------------------------------------------------------------------------ */
/* Module configuration: what validate_batch calls back                                  */
/* ------------------------------------------------------------------------------------ */

enum { F_CID, F_CSEQ, F_RV, F_READS, F_RANGES, F_WRITES, F_EVENTS, N_FIELDS };

static PyObject *g_decode;        /* raw -> WireTxn (msgspec) */
static PyObject *g_decode_errors; /* exceptions that mean "undecodable" */
static PyObject *g_index_factory; /* SortedList */
static PyTypeObject *g_wire_type;
static Py_ssize_t g_off[N_FIELDS];
static PyObject *g_names[N_FIELDS];
static PyObject *g_incl;  /* (True, False) */
static PyObject *s_add, *s_remove, *s_irange;
static PyObject *g_codes[5];

enum { C_COMMITTED, C_CONFLICT, C_TOO_OLD, C_DUPLICATE, C_MALFORMED };

/* A decoded transaction's field: new reference, straight from the struct's slot. */
static inline PyObject *field(PyObject *txn, int i)
{
    if (Py_IS_TYPE(txn, g_wire_type) && g_off[i] >= 0) {
        PyObject *v = *(PyObject **)((char *)txn + g_off[i]);
        if (v) {
            Py_INCREF(v);
            return v;
        }
    }
    return PyObject_GetAttr(txn, g_names[i]);
}

/* ------------------------------------------------------------------------------------ */
/* Keys                                                                                   */
/* ------------------------------------------------------------------------------------ */

static inline uint64_t fmix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static inline uint32_t fold(uint64_t h) { return (uint32_t)(h ^ (h >> 32)); }

typedef struct {
    const char *p;
    Py_ssize_t n;
    uint64_t h;
    PyObject *tmp; /* owns the bytes when the str is not valid UTF-8 (lone surrogates) */
} Key;

/* A str's UTF-8 bytes (borrowed from the str) and its value hash. */
static int key_of(PyObject *s, Key *k)
{
    k->tmp = NULL;
    if (!PyUnicode_Check(s)) {
        PyErr_Format(PyExc_TypeError, "a key must be a str, not %.100s", Py_TYPE(s)->tp_name);
        return -1;
    }
    /* str's own hash even for subclasses: equal strings, equal hashes. */
    Py_hash_t h = PyUnicode_Type.tp_hash(s);
    if (h == -1 && PyErr_Occurred())
        return -1;
    k->h = (uint64_t)h;
    k->p = PyUnicode_AsUTF8AndSize(s, &k->n);
    if (!k->p) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
            return -1;
        PyErr_Clear();
        k->tmp = PyUnicode_AsEncodedString(s, "utf-8", "surrogatepass");
        if (!k->tmp)
            return -1;
        k->p = PyBytes_AS_STRING(k->tmp);
        k->n = PyBytes_GET_SIZE(k->tmp);
    }
    return 0;
}

static inline void key_done(Key *k) { Py_CLEAR(k->tmp); }

static PyObject *str_of(const char *p, size_t n)
{
    return PyUnicode_DecodeUTF8(p, (Py_ssize_t)n, "surrogatepass");
}

/* A txn id's bytes: client_id's UTF-8 then client_seq as 8 big-endian bytes. */
typedef struct {
    char *p;
    size_t n;
    uint64_t h;
    char *heap;
    char small[120];
} IdKey;

static int idkey_of(PyObject *cid, uint64_t cseq, IdKey *k)
{
    Key ck;
    k->heap = NULL;
    if (key_of(cid, &ck) < 0)
        return -1;
    k->n = (size_t)ck.n + 8;
    if (k->n <= sizeof(k->small)) {
        k->p = k->small;
    }
    else {
        k->heap = PyMem_Malloc(k->n);
        if (!k->heap) {
            key_done(&ck);
            PyErr_NoMemory();
            return -1;
        }
        k->p = k->heap;
    }
    memcpy(k->p, ck.p, (size_t)ck.n);
    for (int i = 0; i < 8; i++)
        k->p[ck.n + i] = (char)(cseq >> (56 - 8 * i));
    k->h = fmix64(ck.h ^ fmix64(cseq ^ 0x9e3779b97f4a7c15ULL));
    key_done(&ck);
    return 0;
}

static inline void idkey_done(IdKey *k)
{
    PyMem_Free(k->heap);
    k->heap = NULL;
}

/* ------------------------------------------------------------------------------------ */
/* State                                                                                  */
/* ------------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    uint64_t window; /* saturated at 2**64-1 */
    uint32_t tag_mask;
    int busy;
    Log klog; /* write history: one group of entries per committed txn that wrote */
    Log ilog; /* committed txn ids */
    Table kt; /* key -> seq of its last committed write */
    Table it; /* txn id -> seq it committed at */
    size_t groups;
    PyObject *index; /* SortedList of kt's keys, built on the first range read */
} State;

static inline uint32_t tag_of(State *st, uint64_t h) { return fold(h) & st->tag_mask; }

static int enter(State *st)
{
    if (st->busy) {
        PyErr_SetString(PyExc_RuntimeError, "validator state used re-entrantly");
        return -1;
    }
    st->busy = 1;
    return 0;
}

static PyObject *State_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"window", "tag_mask", NULL};
    PyObject *window;
    unsigned long tag_mask = 0xffffffffUL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!|k:State", kwlist, &PyLong_Type, &window,
                                     &tag_mask))
        return NULL;
    if (PyObject_RichCompareBool(window, g_codes[0], Py_LE) != 0) { /* window <= 0 */
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "window must be positive");
        return NULL;
    }
    unsigned long long w = PyLong_AsUnsignedLongLong(window);
    if (w == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear();
        w = UINT64_MAX; /* no seq can be further than that */
    }
    State *st = (State *)type->tp_alloc(type, 0);
    if (!st)
        return NULL;
    st->window = w;
    st->tag_mask = (uint32_t)tag_mask;
    if (log_init(&st->klog) < 0 || log_init(&st->ilog) < 0 || table_init(&st->kt, 16) < 0 ||
        table_init(&st->it, 16) < 0) {
        Py_DECREF(st);
        return NULL;
    }
    return (PyObject *)st;
}

static void State_dealloc(State *st)
{
    log_free(&st->klog);
    log_free(&st->ilog);
    table_free(&st->kt);
    table_free(&st->it);
    Py_CLEAR(st->index);
    Py_TYPE(st)->tp_free((PyObject *)st);
}

#define PREFETCH_AHEAD 8
#define MAX_PREFETCHED_READS 16

/* Forget history at seqs <= cutoff (the Python _prune, entry by entry). */
static int prune(State *st, uint64_t cutoff)
{
    Log *lg = &st->klog;
    /* The walk is sequential; the slots it deletes are not: ask for them early. */
    for (size_t i = 0; i < PREFETCH_AHEAD && i < lg->count && log_at(lg, i)->seq <= cutoff; i++)
        table_prefetch(&st->kt, log_at(lg, i)->tag);
    while (lg->count && log_front(lg)->seq <= cutoff) {
        if (lg->count > PREFETCH_AHEAD)
            table_prefetch(&st->kt, log_at(lg, PREFETCH_AHEAD)->tag);
        Entry e = *log_front(lg);
        log_pop(lg); /* the bytes stay valid until the next push */
        if (e.flags & F_GROUP)
            st->groups--;
        if (e.flags & F_EMPTY)
            continue;
        const char *p = log_ptr(lg, e.off);
        Py_ssize_t i = table_find(&st->kt, lg, e.tag, p, (size_t)e.len, NULL);
        if (i >= 0 && st->kt.slots[i].seq == e.seq) {
            table_delete(&st->kt, (size_t)i);
            if (st->index) {
                PyObject *key = str_of(p, (size_t)e.len);
                if (!key)
                    return -1;
                PyObject *r = PyObject_CallMethodOneArg(st->index, s_remove, key);
                Py_DECREF(key);
                if (!r)
                    return -1;
                Py_DECREF(r);
            }
        }
    }
    lg = &st->ilog;
    for (size_t i = 0; i < PREFETCH_AHEAD && i < lg->count && log_at(lg, i)->seq <= cutoff; i++)
        table_prefetch(&st->it, log_at(lg, i)->tag);
    while (lg->count && log_front(lg)->seq <= cutoff) {
        if (lg->count > PREFETCH_AHEAD)
            table_prefetch(&st->it, log_at(lg, PREFETCH_AHEAD)->tag);
        Entry e = *log_front(lg);
        log_pop(lg);
        Py_ssize_t i = table_find(&st->it, lg, e.tag, log_ptr(lg, e.off), (size_t)e.len, NULL);
        if (i >= 0 && st->it.slots[i].seq == e.seq)
            table_delete(&st->it, (size_t)i);
    }
    return 0;
}

/* Record a write of key k at seq (history entry + table), as the Python commit does. */
static int set_key(State *st, Key *k, uint64_t seq, uint32_t flags, int maintain_index,
                   PyObject *keyobj)
{
    if (table_reserve(&st->kt) < 0)
        return -1;
    uint32_t tag = tag_of(st, k->h);
    size_t ins = 0;
    Py_ssize_t i = table_find(&st->kt, &st->klog, tag, k->p, (size_t)k->n, &ins);
    if (i < 0 && maintain_index && st->index) {
        PyObject *r = PyObject_CallMethodOneArg(st->index, s_add, keyobj);
        if (!r)
            return -1;
        Py_DECREF(r);
    }
    uint64_t off;
    if (log_push(&st->klog, seq, tag, flags, k->p, (size_t)k->n, &off) < 0)
        return -1;
    table_store(&st->kt, i >= 0 ? (size_t)i : ins, i >= 0, tag, k->p, (size_t)k->n, seq, off);
    return 0;
}

static int set_id(State *st, IdKey *k, uint64_t seq)
{
    if (table_reserve(&st->it) < 0)
        return -1;
    uint32_t tag = tag_of(st, k->h);
    size_t ins = 0;
    Py_ssize_t i = table_find(&st->it, &st->ilog, tag, k->p, k->n, &ins);
    uint64_t off;
    if (log_push(&st->ilog, seq, tag, 0, k->p, k->n, &off) < 0)
        return -1;
    table_store(&st->it, i >= 0 ? (size_t)i : ins, i >= 0, tag, k->p, k->n, seq, off);
    return 0;
}

static PyObject *key_list(State *st)
{
    PyObject *out = PyList_New((Py_ssize_t)st->kt.count);
    if (!out)
        return NULL;
    Py_ssize_t j = 0;
    for (size_t i = 0; i <= st->kt.mask; i++) {
        const Slot *s = &st->kt.slots[i];
        if (!(s->meta & META_USED))
            continue;
        size_t n;
        const char *p = slot_key(s, &st->klog, &n);
        PyObject *k = str_of(p, n);
        if (!k) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, j++, k);
    }
    return out;
}

static int build_index(State *st)
{
    PyObject *keys = key_list(st);
    if (!keys)
        return -1;
    st->index = PyObject_CallOneArg(g_index_factory, keys);
    Py_DECREF(keys);
    return st->index ? 0 : -1;
}

static inline uint64_t lookup_key(State *st, Key *k)
{
    Py_ssize_t i = table_find(&st->kt, &st->klog, tag_of(st, k->h), k->p, (size_t)k->n, NULL);
    return i >= 0 ? st->kt.slots[i].seq : 0;
}

/* -1 error, 0 not negative, 1 negative */
static int is_negative(PyObject *o)
{
    if (PyLong_CheckExact(o)) {
        int ovf;
        long long v = PyLong_AsLongLongAndOverflow(o, &ovf);
        if (v == -1 && PyErr_Occurred())
            return -1;
        return ovf < 0 || (ovf == 0 && v < 0);
    }
    return PyObject_RichCompareBool(o, g_codes[0], Py_LT);
}

/* 1 if op is OP_PUT (1) or OP_DELETE (2), 0 if not, -1 on error */
static int is_known_op(PyObject *op)
{
    if (PyLong_CheckExact(op)) {
        int ovf;
        long long v = PyLong_AsLongLongAndOverflow(op, &ovf);
        if (v == -1 && PyErr_Occurred())
            return -1;
        return ovf == 0 && (v == 1 || v == 2);
    }
    int r = PyObject_RichCompareBool(op, g_codes[1], Py_EQ);
    if (r != 0)
        return r;
    return PyObject_RichCompareBool(op, g_codes[2], Py_EQ);
}

static int shape_error(const char *what)
{
    PyErr_Format(PyExc_TypeError, "decoded transaction: unexpected %s", what);
    return -1;
}

/* codec.check_wire_txn: 1 with *problem set, 0 if fine, -1 on error. */
static int check_txn(PyObject *cseq, PyObject *rv, PyObject *ranges, PyObject *writes,
                     PyObject **problem)
{
    int a = is_negative(cseq);
    if (a < 0)
        return -1;
    int b = a ? 1 : is_negative(rv);
    if (b < 0)
        return -1;
    if (a || b) {
        *problem = PyUnicode_FromString("negative client_seq or read_version");
        return *problem ? 1 : -1;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(ranges); i++) {
        PyObject *rg = PyList_GET_ITEM(ranges, i);
        if (!PyTuple_Check(rg) || PyTuple_GET_SIZE(rg) != 2)
            return shape_error("range");
        PyObject *start = PyTuple_GET_ITEM(rg, 0), *end = PyTuple_GET_ITEM(rg, 1);
        if (end == Py_None)
            continue;
        int lt;
        if (PyUnicode_CheckExact(end) && PyUnicode_CheckExact(start)) {
            lt = PyUnicode_Compare(end, start);
            if (lt == -1 && PyErr_Occurred())
                return -1;
            lt = lt < 0;
        }
        else {
            lt = PyObject_RichCompareBool(end, start, Py_LT);
            if (lt < 0)
                return -1;
        }
        if (lt) {
            *problem = PyUnicode_FromFormat("empty range [%R, %R)", start, end);
            return *problem ? 1 : -1;
        }
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(writes); i++) {
        PyObject *w = PyList_GET_ITEM(writes, i);
        if (!PyTuple_Check(w) || PyTuple_GET_SIZE(w) != 3)
            return shape_error("write");
        PyObject *op = PyTuple_GET_ITEM(w, 0);
        int ok = is_known_op(op);
        if (ok < 0)
            return -1;
        if (!ok) {
            *problem = PyUnicode_FromFormat("unknown write op %S", op);
            return *problem ? 1 : -1;
        }
    }
    return 0;
}

static inline void pack_seq(unsigned char *out, uint64_t seq, int code)
{
    for (int i = 0; i < 8; i++)
        out[i] = (unsigned char)(seq >> (56 - 8 * i));
    out[8] = (unsigned char)code;
}

/* Decide one decoded transaction at seq: the body of the Python loop.  Returns 0 and
   fills code/key/wseq/detail, or -1 on error.  Commits when it decides "committed". */
typedef struct {
    int code;
    PyObject *key;    /* new ref or NULL */
    PyObject *detail; /* new ref or NULL */
    uint64_t wseq;
    int has_wseq;
} Verdict;

static int decide(State *st, PyObject *txn, uint64_t seq, Verdict *v)
{
    PyObject *f[N_FIELDS] = {NULL};
    int ret = -1;
    IdKey id;
    id.heap = NULL;
    Key rk[MAX_PREFETCHED_READS];
    Py_ssize_t nrk = 0;
    for (int i = 0; i < N_FIELDS; i++) {
        f[i] = field(txn, i);
        if (!f[i])
            goto done;
    }
    PyObject *reads = f[F_READS], *ranges = f[F_RANGES], *writes = f[F_WRITES];
    PyObject *events = f[F_EVENTS];
    if (!PyUnicode_Check(f[F_CID]) || !PyList_Check(reads) || !PyList_Check(ranges) ||
        !PyList_Check(writes) || !PyList_Check(events)) {
        shape_error("field types");
        goto done;
    }
    PyObject *problem = NULL;
    int bad = check_txn(f[F_CSEQ], f[F_RV], ranges, writes, &problem);
    if (bad < 0)
        goto done;
    uint64_t r = 0;
    if (!bad) {
        /* r >= seq: malformed */
        r = PyLong_AsUnsignedLongLong(f[F_RV]);
        int too_big = 0;
        if (r == (uint64_t)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                goto done;
            PyErr_Clear();
            too_big = 1;
        }
        if (too_big || r >= seq) {
            problem = PyUnicode_FromFormat("read_version %S is not before seq %llu", f[F_RV],
                                           (unsigned long long)seq);
            if (!problem)
                goto done;
            bad = 1;
        }
    }
    if (bad) {
        v->code = C_MALFORMED;
        v->detail = problem;
        ret = 0;
        goto done;
    }
    uint64_t cseq = PyLong_AsUnsignedLongLong(f[F_CSEQ]);
    if (cseq == (uint64_t)-1 && PyErr_Occurred())
        goto done;
    int has_floor = seq >= 1 && seq - 1 > st->window;
    uint64_t floor = has_floor ? seq - 1 - st->window : 0;

    if (idkey_of(f[F_CID], cseq, &id) < 0)
        goto done;
    Py_ssize_t nreads = PyList_GET_SIZE(reads), nranges = PyList_GET_SIZE(ranges);
    /* Issue every slot load this transaction needs before using any: their cache
       misses then overlap instead of following one another. */
    table_prefetch(&st->it, tag_of(st, id.h));
    for (Py_ssize_t i = 0; i < nreads && i < MAX_PREFETCHED_READS; i++) {
        if (key_of(PyList_GET_ITEM(reads, i), &rk[i]) < 0)
            goto done;
        nrk = i + 1;
        table_prefetch(&st->kt, tag_of(st, rk[i].h));
    }
    Py_ssize_t di = table_find(&st->it, &st->ilog, tag_of(st, id.h), id.p, id.n, NULL);
    if (di >= 0 && (!has_floor || st->it.slots[di].seq > floor)) {
        v->code = C_DUPLICATE;
        v->wseq = st->it.slots[di].seq;
        v->has_wseq = 1;
        ret = 0;
        goto done;
    }
    if (nreads || nranges) {
        if (has_floor && r < floor) {
            v->code = C_TOO_OLD;
            v->detail = PyUnicode_FromFormat("read_version %S is older than the window (%llu)",
                                             f[F_RV], (unsigned long long)floor);
            ret = v->detail ? 0 : -1;
            goto done;
        }
        for (Py_ssize_t i = 0; i < nreads; i++) {
            PyObject *ko = PyList_GET_ITEM(reads, i);
            uint64_t w;
            if (i < nrk) {
                w = lookup_key(st, &rk[i]);
            }
            else {
                Key k;
                if (key_of(ko, &k) < 0)
                    goto done;
                w = lookup_key(st, &k);
                key_done(&k);
            }
            if (w > r) {
                v->code = C_CONFLICT;
                Py_INCREF(ko);
                v->key = ko;
                v->wseq = w;
                v->has_wseq = 1;
                ret = 0;
                goto done;
            }
        }
        if (nranges) {
            if (!st->index && build_index(st) < 0)
                goto done;
            for (Py_ssize_t i = 0; i < nranges; i++) {
                PyObject *rg = PyList_GET_ITEM(ranges, i);
                PyObject *it = PyObject_CallMethodObjArgs(st->index, s_irange,
                                                          PyTuple_GET_ITEM(rg, 0),
                                                          PyTuple_GET_ITEM(rg, 1), g_incl, NULL);
                if (!it)
                    goto done;
                PyObject *ko;
                while ((ko = PyIter_Next(it)) != NULL) {
                    Key k;
                    if (key_of(ko, &k) < 0) {
                        Py_DECREF(ko);
                        Py_DECREF(it);
                        goto done;
                    }
                    Py_ssize_t si = table_find(&st->kt, &st->klog, tag_of(st, k.h), k.p,
                                               (size_t)k.n, NULL);
                    key_done(&k);
                    if (si < 0) {
                        Py_DECREF(ko);
                        Py_DECREF(it);
                        PyErr_SetString(PyExc_SystemError, "range index out of step with table");
                        goto done;
                    }
                    uint64_t w = st->kt.slots[si].seq;
                    if (w > r) {
                        v->code = C_CONFLICT;
                        v->key = ko; /* keeps the iterator's reference */
                        v->wseq = w;
                        v->has_wseq = 1;
                        break;
                    }
                    Py_DECREF(ko);
                }
                Py_DECREF(it);
                if (PyErr_Occurred())
                    goto done;
                if (v->code) {
                    ret = 0;
                    goto done;
                }
            }
        }
    }
    /* committed: record its writes (put/delete keys, then events' conflict keys) */
    {
        uint32_t flags = F_GROUP;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(writes); i++) {
            PyObject *ko = PyTuple_GET_ITEM(PyList_GET_ITEM(writes, i), 1);
            Key k;
            if (key_of(ko, &k) < 0)
                goto done;
            int rc = set_key(st, &k, seq, flags, 1, ko);
            key_done(&k);
            if (rc < 0)
                goto done;
            flags = 0;
        }
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(events); i++) {
            PyObject *ev = PyList_GET_ITEM(events, i);
            if (!PyTuple_Check(ev) || PyTuple_GET_SIZE(ev) != 3 ||
                !PyList_Check(PyTuple_GET_ITEM(ev, 2))) {
                shape_error("event");
                goto done;
            }
            PyObject *ckeys = PyTuple_GET_ITEM(ev, 2);
            for (Py_ssize_t j = 0; j < PyList_GET_SIZE(ckeys); j++) {
                PyObject *ko = PyList_GET_ITEM(ckeys, j);
                Key k;
                if (key_of(ko, &k) < 0)
                    goto done;
                int rc = set_key(st, &k, seq, flags, 1, ko);
                key_done(&k);
                if (rc < 0)
                    goto done;
                flags = 0;
            }
        }
        if (!flags)
            st->groups++;
        if (set_id(st, &id, seq) < 0)
            goto done;
        v->code = C_COMMITTED;
        ret = 0;
    }
done:
    for (Py_ssize_t i = 0; i < nrk; i++)
        key_done(&rk[i]);
    idkey_done(&id);
    for (int i = 0; i < N_FIELDS; i++)
        Py_XDECREF(f[i]);
    return ret;
}

static PyObject *State_validate_batch(State *st, PyObject *args)
{
    PyObject *raws_in, *first_o, *digest_in;
    if (!PyArg_ParseTuple(args, "OO!S:validate_batch", &raws_in, &PyLong_Type, &first_o,
                          &digest_in))
        return NULL;
    if (!g_decode) {
        PyErr_SetString(PyExc_RuntimeError, "_cstate.configure() was not called");
        return NULL;
    }
    uint64_t first = PyLong_AsUnsignedLongLong(first_o);
    if (first == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    /* A private copy: the caller's list cannot change under us during callbacks. */
    PyObject *raws = PySequence_Tuple(raws_in);
    if (!raws)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(raws);
    if (n > 0 && first + (uint64_t)(n - 1) < first) {
        Py_DECREF(raws);
        PyErr_SetString(PyExc_OverflowError, "seqs of this batch pass 2**64-1");
        return NULL;
    }
    if (enter(st) < 0) {
        Py_DECREF(raws);
        return NULL;
    }
    PyObject *outcomes = NULL, *applied = NULL, *result = NULL;
    unsigned char cur[16];
    const unsigned char *dp = (const unsigned char *)PyBytes_AS_STRING(digest_in);
    size_t dl = (size_t)PyBytes_GET_SIZE(digest_in);

    if (first >= 1 && first - 1 > st->window && prune(st, first - 1 - st->window) < 0)
        goto out;
    outcomes = PyList_New(n);
    applied = PyList_New(0);
    if (!outcomes || !applied)
        goto out;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t seq = first + (uint64_t)i;
        PyObject *raw = PyTuple_GET_ITEM(raws, i);
        Verdict v = {C_COMMITTED, NULL, NULL, 0, 0};
        PyObject *tid = NULL;
        PyObject *txn = PyObject_CallOneArg(g_decode, raw);
        if (!txn) {
            if (!PyErr_ExceptionMatches(g_decode_errors))
                goto out;
#if PY_VERSION_HEX >= 0x030C0000
            PyObject *exc = PyErr_GetRaisedException();
#else
            PyObject *et, *ev, *tb;
            PyErr_Fetch(&et, &ev, &tb);
            PyErr_NormalizeException(&et, &ev, &tb);
            Py_XDECREF(et);
            Py_XDECREF(tb);
            PyObject *exc = ev;
#endif
            v.code = C_MALFORMED;
            v.detail = exc ? PyUnicode_FromFormat("undecodable: %S", exc) : NULL;
            Py_XDECREF(exc);
            if (!v.detail)
                goto out;
        }
        else {
            PyObject *cid = field(txn, F_CID), *cseq = cid ? field(txn, F_CSEQ) : NULL;
            if (cseq)
                tid = PyTuple_Pack(2, cid, cseq);
            Py_XDECREF(cid);
            Py_XDECREF(cseq);
            if (!tid || decide(st, txn, seq, &v) < 0) {
                Py_XDECREF(tid);
                Py_XDECREF(v.key);
                Py_XDECREF(v.detail);
                Py_DECREF(txn);
                goto out;
            }
        }
        /* digest = blake2b(digest + pack(seq, code) [+ raw if committed], 16) */
        unsigned char pk[9], nd[16];
        B2 S;
        pack_seq(pk, seq, v.code);
        b2_init(&S, 16);
        b2_update(&S, dp, dl);
        b2_update(&S, pk, 9);
        int err = 0;
        PyObject *seq_o = PyLong_FromUnsignedLongLong(seq);
        if (!seq_o)
            err = 1;
        if (!err && v.code == C_COMMITTED) {
            Py_buffer view;
            if (PyObject_GetBuffer(raw, &view, PyBUF_SIMPLE) < 0) {
                err = 1;
            }
            else {
                b2_update(&S, view.buf, (size_t)view.len);
                PyBuffer_Release(&view);
                PyObject *ap = PyTuple_Pack(2, seq_o, txn);
                if (!ap || PyList_Append(applied, ap) < 0)
                    err = 1;
                Py_XDECREF(ap);
            }
        }
        PyObject *o = err ? NULL : PyTuple_New(6);
        if (o) {
            PyObject *w = v.has_wseq ? PyLong_FromUnsignedLongLong(v.wseq) : Py_NewRef(Py_None);
            if (!w) {
                Py_DECREF(o);
                o = NULL;
            }
            else {
                PyTuple_SET_ITEM(o, 0, Py_NewRef(seq_o));
                PyTuple_SET_ITEM(o, 1, tid ? tid : Py_NewRef(Py_None));
                tid = NULL;
                PyTuple_SET_ITEM(o, 2, Py_NewRef(g_codes[v.code]));
                PyTuple_SET_ITEM(o, 3, v.key ? v.key : Py_NewRef(Py_None));
                v.key = NULL;
                PyTuple_SET_ITEM(o, 4, w);
                PyTuple_SET_ITEM(o, 5, v.detail ? v.detail : Py_NewRef(Py_None));
                v.detail = NULL;
                PyList_SET_ITEM(outcomes, i, o);
            }
        }
        Py_XDECREF(seq_o);
        Py_XDECREF(tid);
        Py_XDECREF(v.key);
        Py_XDECREF(v.detail);
        Py_XDECREF(txn);
        if (!o)
            goto out;
        b2_final(&S, nd);
        memcpy(cur, nd, 16);
        dp = cur;
        dl = 16;
    }
    {
        PyObject *dg = n ? PyBytes_FromStringAndSize((const char *)cur, 16) : Py_NewRef(digest_in);
        if (dg)
            result = PyTuple_Pack(3, outcomes, applied, dg);
        Py_XDECREF(dg);
    }
out:
    st->busy = 0;
    Py_DECREF(raws);
    Py_XDECREF(outcomes);
    Py_XDECREF(applied);
    return result;
}

static PyObject *State_prune(State *st, PyObject *arg)
{
    uint64_t cutoff = PyLong_AsUnsignedLongLong(arg);
    if (cutoff == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    if (enter(st) < 0)
        return NULL;
    int rc = prune(st, cutoff);
    st->busy = 0;
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int seq_arg(PyObject *o, uint64_t *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "a seq must be an int, not %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    *out = PyLong_AsUnsignedLongLong(o);
    if (*out == (uint64_t)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError))
            PyErr_SetString(PyExc_ValueError, "a seq must be in [0, 2**64)");
        return -1;
    }
    return 0;
}

/* load(history, committed_history): what ValidatorState.restore does with a snapshot's
   [[seq, [key, ...]], ...] and [[seq, client_id, client_seq], ...], in order. */
static PyObject *State_load(State *st, PyObject *args)
{
    PyObject *hist, *chist;
    if (!PyArg_ParseTuple(args, "OO:load", &hist, &chist))
        return NULL;
    PyObject *h = PySequence_Fast(hist, "history must be a sequence");
    if (!h)
        return NULL;
    PyObject *c = PySequence_Fast(chist, "committed history must be a sequence");
    if (!c) {
        Py_DECREF(h);
        return NULL;
    }
    if (enter(st) < 0) {
        Py_DECREF(h);
        Py_DECREF(c);
        return NULL;
    }
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(h); i++) {
        PyObject *g = PySequence_Fast_GET_ITEM(h, i);
        if (!PyTuple_Check(g) && !PyList_Check(g)) {
            PyErr_SetString(PyExc_TypeError, "history group must be [seq, keys]");
            goto out;
        }
        PyObject *gf = PySequence_Fast(g, "");
        if (!gf)
            goto out;
        uint64_t seq;
        PyObject *keys = NULL;
        if (PySequence_Fast_GET_SIZE(gf) != 2 || seq_arg(PySequence_Fast_GET_ITEM(gf, 0), &seq) < 0 ||
            !(keys = PySequence_Fast(PySequence_Fast_GET_ITEM(gf, 1), "keys must be a sequence"))) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "history group must be [seq, keys]");
            Py_DECREF(gf);
            goto out;
        }
        Py_ssize_t nk = PySequence_Fast_GET_SIZE(keys);
        int rc = 0;
        if (nk == 0) {
            uint64_t off;
            rc = log_push(&st->klog, seq, 0, F_GROUP | F_EMPTY, NULL, 0, &off);
        }
        for (Py_ssize_t j = 0; j < nk && rc == 0; j++) {
            Key k;
            rc = key_of(PySequence_Fast_GET_ITEM(keys, j), &k);
            if (rc == 0) {
                rc = set_key(st, &k, seq, j == 0 ? F_GROUP : 0, 0, NULL);
                key_done(&k);
            }
        }
        Py_DECREF(keys);
        Py_DECREF(gf);
        if (rc < 0)
            goto out;
        st->groups++;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(c); i++) {
        PyObject *g = PySequence_Fast_GET_ITEM(c, i);
        if (!PyTuple_Check(g) && !PyList_Check(g)) {
            PyErr_SetString(PyExc_TypeError, "committed entry must be [seq, client_id, client_seq]");
            goto out;
        }
        PyObject *gf = PySequence_Fast(g, "");
        if (!gf)
            goto out;
        uint64_t seq, cseq;
        int rc = -1;
        if (PySequence_Fast_GET_SIZE(gf) == 3 && seq_arg(PySequence_Fast_GET_ITEM(gf, 0), &seq) == 0 &&
            seq_arg(PySequence_Fast_GET_ITEM(gf, 2), &cseq) == 0) {
            IdKey id;
            if (idkey_of(PySequence_Fast_GET_ITEM(gf, 1), cseq, &id) == 0) {
                rc = set_id(st, &id, seq);
                idkey_done(&id);
            }
        }
        else if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "committed entry must be [seq, client_id, client_seq]");
        }
        Py_DECREF(gf);
        if (rc < 0)
            goto out;
    }
    result = Py_NewRef(Py_None);
out:
    st->busy = 0;
    Py_DECREF(h);
    Py_DECREF(c);
    return result;
}

/* export() -> (history, committed_history) in the snapshot's shape. */
static PyObject *State_export_impl(State *st)
{
    PyObject *hist = PyList_New(0), *chist = PyList_New(0), *group = NULL, *res = NULL;
    if (!hist || !chist)
        goto out;
    Log *lg = &st->klog;
    for (size_t i = 0; i < lg->count; i++) {
        Entry *e = log_at(lg, i);
        if (e->flags & F_GROUP) {
            PyObject *s = PyLong_FromUnsignedLongLong(e->seq);
            group = PyList_New(0);
            PyObject *pair = (s && group) ? PyList_New(2) : NULL;
            if (!pair) {
                Py_XDECREF(s);
                Py_CLEAR(group);
                goto out;
            }
            PyList_SET_ITEM(pair, 0, s);
            PyList_SET_ITEM(pair, 1, group); /* pair owns it; group stays borrowed */
            int rc = PyList_Append(hist, pair);
            Py_DECREF(pair);
            if (rc < 0)
                goto out;
        }
        if (e->flags & F_EMPTY)
            continue;
        if (!group) {
            PyErr_SetString(PyExc_SystemError, "history entry outside a group");
            goto out;
        }
        PyObject *k = str_of(log_ptr(lg, e->off), (size_t)e->len);
        if (!k || PyList_Append(group, k) < 0) {
            Py_XDECREF(k);
            goto out;
        }
        Py_DECREF(k);
    }
    lg = &st->ilog;
    for (size_t i = 0; i < lg->count; i++) {
        Entry *e = log_at(lg, i);
        const unsigned char *p = (const unsigned char *)log_ptr(lg, e->off);
        size_t n = (size_t)e->len - 8;
        uint64_t cseq = 0;
        for (int j = 0; j < 8; j++)
            cseq = (cseq << 8) | p[n + j];
        PyObject *t = PyList_New(3);
        PyObject *a = PyLong_FromUnsignedLongLong(e->seq), *b = str_of((const char *)p, n),
                 *c = PyLong_FromUnsignedLongLong(cseq);
        if (!t || !a || !b || !c) {
            Py_XDECREF(t);
            Py_XDECREF(a);
            Py_XDECREF(b);
            Py_XDECREF(c);
            goto out;
        }
        PyList_SET_ITEM(t, 0, a);
        PyList_SET_ITEM(t, 1, b);
        PyList_SET_ITEM(t, 2, c);
        int rc = PyList_Append(chist, t);
        Py_DECREF(t);
        if (rc < 0)
            goto out;
    }
    res = PyTuple_Pack(2, hist, chist);
out:
    Py_XDECREF(hist);
    Py_XDECREF(chist);
    return res;
}

static PyObject *State_size(State *st, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSize_t(st->kt.count + st->it.count + st->groups);
}

static PyObject *State_get(State *st, PyObject *key)
{
    Key k;
    if (key_of(key, &k) < 0)
        return NULL;
    uint64_t w = lookup_key(st, &k);
    key_done(&k);
    return PyLong_FromUnsignedLongLong(w);
}

static PyObject *State_committed_seq(State *st, PyObject *args)
{
    PyObject *cid, *cseq_o;
    uint64_t cseq;
    if (!PyArg_ParseTuple(args, "UO:committed_seq", &cid, &cseq_o) || seq_arg(cseq_o, &cseq) < 0)
        return NULL;
    IdKey id;
    if (idkey_of(cid, cseq, &id) < 0)
        return NULL;
    Py_ssize_t i = table_find(&st->it, &st->ilog, tag_of(st, id.h), id.p, id.n, NULL);
    idkey_done(&id);
    if (i < 0)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(st->it.slots[i].seq);
}

static PyObject *State_last_writes_impl(State *st)
{
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    for (size_t i = 0; i <= st->kt.mask; i++) {
        const Slot *s = &st->kt.slots[i];
        if (!(s->meta & META_USED))
            continue;
        size_t n;
        const char *p = slot_key(s, &st->klog, &n);
        PyObject *k = str_of(p, n), *v = PyLong_FromUnsignedLongLong(s->seq);
        int rc = (k && v) ? PyDict_SetItem(d, k, v) : -1;
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (rc < 0) {
            Py_DECREF(d);
            return NULL;
        }
    }
    return d;
}

static PyObject *State_committed_ids_impl(State *st)
{
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    for (size_t i = 0; i <= st->it.mask; i++) {
        const Slot *s = &st->it.slots[i];
        if (!(s->meta & META_USED))
            continue;
        size_t n;
        const unsigned char *p = (const unsigned char *)slot_key(s, &st->ilog, &n);
        uint64_t cseq = 0;
        for (int j = 0; j < 8; j++)
            cseq = (cseq << 8) | p[n - 8 + j];
        PyObject *cid = str_of((const char *)p, n - 8);
        PyObject *cs = PyLong_FromUnsignedLongLong(cseq);
        PyObject *k = (cid && cs) ? PyTuple_Pack(2, cid, cs) : NULL;
        PyObject *v = PyLong_FromUnsignedLongLong(s->seq);
        int rc = (k && v) ? PyDict_SetItem(d, k, v) : -1;
        Py_XDECREF(cid);
        Py_XDECREF(cs);
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (rc < 0) {
            Py_DECREF(d);
            return NULL;
        }
    }
    return d;
}

static PyObject *State_keys_impl(State *st) { return key_list(st); }

static int check_table(const Table *t, const Log *lg, const char *name, size_t *maxrun)
{
    size_t used = 0, cap = t->mask + 1;
    for (size_t i = 0; i < cap; i++) {
        const Slot *s = &t->slots[i];
        if (!(s->meta & META_USED))
            continue;
        used++;
        size_t home = s->tag & t->mask, d = (i - home) & t->mask;
        if (d + 1 > *maxrun)
            *maxrun = d + 1;
        for (size_t j = home; j != i; j = (j + 1) & t->mask) {
            if (!(t->slots[j].meta & META_USED)) {
                PyErr_Format(PyExc_AssertionError, "%s: slot %zu unreachable from home %zu",
                             name, i, home);
                return -1;
            }
        }
        uint32_t m = s->meta & ~META_USED;
        if (m == META_EXT) {
            if (s->k.ext.len <= INLINE_MAX || s->k.ext.off < lg->ahead ||
                s->k.ext.off + s->k.ext.len > lg->atail) {
                PyErr_Format(PyExc_AssertionError, "%s: slot %zu references dead bytes", name, i);
                return -1;
            }
        }
        else if (m > INLINE_MAX) {
            PyErr_Format(PyExc_AssertionError, "%s: slot %zu has bad meta", name, i);
            return -1;
        }
        /* the key's slot is the one a lookup finds */
        size_t n;
        const char *p = slot_key(s, lg, &n);
        if (table_find(t, lg, s->tag, p, n, NULL) != (Py_ssize_t)i) {
            PyErr_Format(PyExc_AssertionError, "%s: key of slot %zu stored twice", name, i);
            return -1;
        }
    }
    if (used != t->count) {
        PyErr_Format(PyExc_AssertionError, "%s: count %zu but %zu slots used", name, t->count,
                     used);
        return -1;
    }
    return 0;
}

static int check_log(const Log *lg, const char *name, size_t *groups)
{
    uint64_t off = lg->ahead;
    if (lg->ahead < lg->abase || lg->atail - lg->abase > lg->acap) {
        PyErr_Format(PyExc_AssertionError, "%s: arena bounds", name);
        return -1;
    }
    for (size_t i = 0; i < lg->count; i++) {
        const Entry *e = &lg->ring[(lg->head + i) & lg->rmask];
        if (e->off != off) {
            PyErr_Format(PyExc_AssertionError, "%s: entry %zu not contiguous", name, i);
            return -1;
        }
        off += e->len;
        if (e->flags & F_GROUP)
            (*groups)++;
        if (i == 0 && name[0] == 'k' && !(e->flags & F_GROUP)) {
            PyErr_Format(PyExc_AssertionError, "%s: first entry does not start a group", name);
            return -1;
        }
    }
    if (off != lg->atail) {
        PyErr_Format(PyExc_AssertionError, "%s: arena tail", name);
        return -1;
    }
    return 0;
}

/* check() -> dict of figures; raises AssertionError if an internal invariant is broken. */
static PyObject *State_check_impl(State *st)
{
    size_t krun = 0, irun = 0, groups = 0, igroups = 0;
    if (check_table(&st->kt, &st->klog, "keys", &krun) < 0 ||
        check_table(&st->it, &st->ilog, "ids", &irun) < 0 ||
        check_log(&st->klog, "klog", &groups) < 0 || check_log(&st->ilog, "ilog", &igroups) < 0)
        return NULL;
    if (groups != st->groups) {
        PyErr_Format(PyExc_AssertionError, "groups %zu counted %zu", st->groups, groups);
        return NULL;
    }
    /* every key slot's seq is the seq of a live history entry for that key */
    for (size_t i = 0; i <= st->kt.mask; i++) {
        const Slot *s = &st->kt.slots[i];
        if (!(s->meta & META_USED))
            continue;
        if ((s->meta & ~META_USED) == META_EXT) {
            /* the referenced bytes must be those of an entry with the slot's seq */
            int ok = 0;
            for (size_t j = 0; j < st->klog.count && !ok; j++) {
                const Entry *e = log_at(&st->klog, j);
                ok = e->off == s->k.ext.off && e->seq == s->seq && e->len == s->k.ext.len;
            }
            if (!ok) {
                PyErr_Format(PyExc_AssertionError, "keys: slot %zu references a stale entry", i);
                return NULL;
            }
        }
    }
    return Py_BuildValue("{s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:O}", "key_capacity",
                         (Py_ssize_t)(st->kt.mask + 1), "keys", (Py_ssize_t)st->kt.count,
                         "key_max_run", (Py_ssize_t)krun, "id_capacity",
                         (Py_ssize_t)(st->it.mask + 1), "ids", (Py_ssize_t)st->it.count,
                         "id_max_run", (Py_ssize_t)irun, "history_entries",
                         (Py_ssize_t)st->klog.count, "groups", (Py_ssize_t)st->groups,
                         "id_entries", (Py_ssize_t)st->ilog.count, "arena_bytes",
                         (Py_ssize_t)(st->klog.acap + st->ilog.acap), "has_index",
                         st->index ? Py_True : Py_False);
}

static PyObject *State_export(State *st, PyObject *Py_UNUSED(ignored))
{
    /* allocating may run arbitrary code (finalizers): no one may change the state
       while it is being walked */
    if (enter(st) < 0)
        return NULL;
    PyObject *r = State_export_impl(st);
    st->busy = 0;
    return r;
}

static PyObject *State_last_writes(State *st, PyObject *Py_UNUSED(ignored))
{
    /* allocating may run arbitrary code (finalizers): no one may change the state
       while it is being walked */
    if (enter(st) < 0)
        return NULL;
    PyObject *r = State_last_writes_impl(st);
    st->busy = 0;
    return r;
}

static PyObject *State_committed_ids(State *st, PyObject *Py_UNUSED(ignored))
{
    /* allocating may run arbitrary code (finalizers): no one may change the state
       while it is being walked */
    if (enter(st) < 0)
        return NULL;
    PyObject *r = State_committed_ids_impl(st);
    st->busy = 0;
    return r;
}

static PyObject *State_check(State *st, PyObject *Py_UNUSED(ignored))
{
    /* allocating may run arbitrary code (finalizers): no one may change the state
       while it is being walked */
    if (enter(st) < 0)
        return NULL;
    PyObject *r = State_check_impl(st);
    st->busy = 0;
    return r;
}

static PyObject *State_keys(State *st, PyObject *Py_UNUSED(ignored))
{
    if (enter(st) < 0)
        return NULL;
    PyObject *r = State_keys_impl(st);
    st->busy = 0;
    return r;
}

static PyObject *State_get_index(State *st, void *Py_UNUSED(c))
{
    return Py_NewRef(st->index ? st->index : Py_None);
}

static PyObject *State_sizeof(State *st, PyObject *Py_UNUSED(ignored))
{
    size_t n = sizeof(State) + (st->kt.mask + 1 + st->it.mask + 1) * sizeof(Slot) +
               (st->klog.rmask + 1 + st->ilog.rmask + 1) * sizeof(Entry) + st->klog.acap +
               st->ilog.acap;
    return PyLong_FromSize_t(n);
}

static PyMethodDef State_methods[] = {
    {"validate_batch", (PyCFunction)State_validate_batch, METH_VARARGS,
     "validate_batch(raws, first_seq, digest) -> (outcomes, applied, digest)"},
    {"prune", (PyCFunction)State_prune, METH_O, "prune(cutoff): forget seqs <= cutoff"},
    {"load", (PyCFunction)State_load, METH_VARARGS, "load(history, committed_history)"},
    {"export", (PyCFunction)State_export, METH_NOARGS,
     "export() -> (history, committed_history), as in a snapshot"},
    {"size", (PyCFunction)State_size, METH_NOARGS, "entries held (ValidatorState.size)"},
    {"get", (PyCFunction)State_get, METH_O, "get(key) -> seq of its last write, or 0"},
    {"committed_seq", (PyCFunction)State_committed_seq, METH_VARARGS,
     "committed_seq(client_id, client_seq) -> seq or None"},
    {"last_writes", (PyCFunction)State_last_writes, METH_NOARGS, "{key: seq} (tests, tools)"},
    {"committed_ids", (PyCFunction)State_committed_ids, METH_NOARGS,
     "{(client_id, client_seq): seq} (tests, tools)"},
    {"keys", (PyCFunction)State_keys, METH_NOARGS, "keys with a remembered write, any order"},
    {"check", (PyCFunction)State_check, METH_NOARGS, "verify invariants; dict of figures"},
    {"__sizeof__", (PyCFunction)State_sizeof, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef State_getset[] = {
    {"index", (getter)State_get_index, NULL, "the range index (SortedList) or None", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject StateType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ledgerlog.validator._cstate.State",
    .tp_basicsize = sizeof(State),
    .tp_dealloc = (destructor)State_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "State(window, tag_mask=0xffffffff): the validator's compact hot state.\n\n"
              "tag_mask is a test hook: masking the hash provokes collisions.",
    .tp_methods = State_methods,
    .tp_getset = State_getset,
    .tp_new = State_new,
};

/* ------------------------------------------------------------------------------------ */
/* Module                                                                                 */
/* ------------------------------------------------------------------------------------ */

static PyObject *mod_configure(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *decode, *errors, *factory, *wire, *names;
    if (!PyArg_ParseTuple(args, "OO!OO!O:configure", &decode, &PyTuple_Type, &errors, &factory,
                          &PyType_Type, &wire, &names))
        return NULL;
    PyObject *nf = PySequence_Fast(names, "field names must be a sequence");
    if (!nf)
        return NULL;
    if (PySequence_Fast_GET_SIZE(nf) != N_FIELDS) {
        Py_DECREF(nf);
        PyErr_Format(PyExc_ValueError, "expected %d field names", N_FIELDS);
        return NULL;
    }
    for (int i = 0; i < N_FIELDS; i++) {
        PyObject *name = PySequence_Fast_GET_ITEM(nf, i);
        if (!PyUnicode_Check(name)) {
            Py_DECREF(nf);
            PyErr_SetString(PyExc_TypeError, "field names must be str");
            return NULL;
        }
    }
    for (int i = 0; i < N_FIELDS; i++) {
        PyObject *name = PySequence_Fast_GET_ITEM(nf, i);
        Py_INCREF(name);
        PyUnicode_InternInPlace(&name);
        Py_XSETREF(g_names[i], name);
        g_off[i] = -1;
        PyObject *d = PyDict_GetItemWithError(((PyTypeObject *)wire)->tp_dict, name);
        if (d && Py_IS_TYPE(d, &PyMemberDescr_Type)) {
            PyMemberDef *md = ((PyMemberDescrObject *)d)->d_member;
            if (md->type == T_OBJECT_EX && md->offset > 0)
                g_off[i] = md->offset;
        }
        else if (PyErr_Occurred()) {
            Py_DECREF(nf);
            return NULL;
        }
    }
    Py_DECREF(nf);
    Py_INCREF(decode);
    Py_XSETREF(g_decode, decode);
    Py_INCREF(errors);
    Py_XSETREF(g_decode_errors, errors);
    Py_INCREF(factory);
    Py_XSETREF(g_index_factory, factory);
    Py_INCREF(wire);
    Py_XSETREF(g_wire_type, (PyTypeObject *)wire);
    int fast = 1;
    for (int i = 0; i < N_FIELDS; i++)
        fast &= g_off[i] >= 0;
    return PyBool_FromLong(fast);
}

static PyObject *mod_blake2b(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t outlen = 16;
    if (!PyArg_ParseTuple(args, "y*|n:blake2b", &buf, &outlen))
        return NULL;
    if (outlen < 1 || outlen > 64) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "digest size must be in 1..64");
        return NULL;
    }
    B2 S;
    unsigned char out[64];
    b2_init(&S, (size_t)outlen);
    /* feed in uneven pieces to exercise the streaming path */
    const unsigned char *p = buf.buf;
    size_t n = (size_t)buf.len, step = 1;
    while (n) {
        size_t k = step < n ? step : n;
        b2_update(&S, p, k);
        p += k;
        n -= k;
        step = step * 3 + 1;
    }
    b2_final(&S, out);
    PyBuffer_Release(&buf);
    return PyBytes_FromStringAndSize((const char *)out, outlen);
}

static PyMethodDef mod_methods[] = {
    {"configure", mod_configure, METH_VARARGS,
     "configure(decode, decode_errors, index_factory, wire_type, field_names) -> bool "
     "(True if fields are read straight from the struct)"},
    {"blake2b", mod_blake2b, METH_VARARGS, "blake2b(data, digest_size=16) -> bytes (tests)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "ledgerlog.validator._cstate",
    "Compact validator state (optional C speed-up of ledgerlog.validator).", -1, mod_methods};

PyMODINIT_FUNC PyInit__cstate(void)
{
    if (PyType_Ready(&StateType) < 0)
        return NULL;
    for (int i = 0; i < 5; i++) {
        g_codes[i] = PyLong_FromLong(i);
        if (!g_codes[i])
            return NULL;
    }
    g_incl = PyTuple_Pack(2, Py_True, Py_False);
    s_add = PyUnicode_InternFromString("add");
    s_remove = PyUnicode_InternFromString("remove");
    s_irange = PyUnicode_InternFromString("irange");
    if (!g_incl || !s_add || !s_remove || !s_irange)
        return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m)
        return NULL;
    Py_INCREF(&StateType);
    if (PyModule_AddObject(m, "State", (PyObject *)&StateType) < 0) {
        Py_DECREF(&StateType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "INLINE_MAX", INLINE_MAX) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
