/*
 * Compiled hot path: a Codec 8 / 8E / 16 AVL data field straight to the pieces of each
 * record's JSON payload (contract.md section 3), without building Python record objects.
 *
 *     payload_parts(data: bytes) -> (codec: str, count: int, parts: list[bytes])
 *
 * parts = [ts_0, tail_0, ts_1, tail_1, ...]: ts_i is the record's ISO 8601 timestamp
 * ("2019-06-10T10:04:46.000Z"); tail_i is the payload after "received_at", i.e. from
 * ',"codec":' to '"gps_valid":true' or 'false' (contract.md section 8: false when there are
 * no satellites or both coordinates are 0). The caller (codec/payload.py,
 * payloads_and_flags) adds '{"device_id":..,"timestamp":"' ts '","received_at":"..."' in
 * front and ',"time_valid":...}' behind (it depends on received_at, which only it knows).
 *
 * This is an accelerator only. It raises ValueError whenever it is not sure to produce
 * exactly what the pure-Python decoder and payload builder would: any malformed frame,
 * and the rare legal inputs it does not handle (a repeated IO id, zero records, a
 * coordinate below 1e-4 degrees whose JSON float orjson writes without an exponent).
 * The caller then runs the Python decoder, which gives the precise error or the result.
 * tests/test_fastavl.py checks, on every vector and on generated and random data, that
 * whenever this succeeds the Python path succeeds with byte-identical payloads.
 *
 * Pure C on the CPython API; no I/O, no global state.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_TIMESTAMP_MS 253402300800000ULL /* 10000-01-01T00:00:00Z */

typedef struct {
    char *buf;
    Py_ssize_t len;
    Py_ssize_t cap;
} Out;

static int out_reserve(Out *o, Py_ssize_t more) {
    if (o->len + more <= o->cap) return 0;
    Py_ssize_t cap = o->cap ? o->cap : 1024;
    while (cap < o->len + more) cap *= 2;
    char *nb = PyMem_Realloc(o->buf, (size_t)cap);
    if (nb == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->buf = nb;
    o->cap = cap;
    return 0;
}

static inline int out_put(Out *o, const char *s, Py_ssize_t n) {
    if (out_reserve(o, n) < 0) return -1;
    memcpy(o->buf + o->len, s, (size_t)n);
    o->len += n;
    return 0;
}

#define PUT_LIT(o, lit) out_put((o), (lit), (Py_ssize_t)(sizeof(lit) - 1))

static inline int out_u64(Out *o, uint64_t v) {
    char tmp[24];
    int i = 24;
    do {
        tmp[--i] = (char)('0' + (v % 10));
        v /= 10;
    } while (v);
    return out_put(o, tmp + i, 24 - i);
}

static inline int out_i64(Out *o, int64_t v) {
    if (v < 0) {
        if (PUT_LIT(o, "-") < 0) return -1;
        return out_u64(o, (uint64_t)(-(v + 1)) + 1);
    }
    return out_u64(o, (uint64_t)v);
}

/* A coordinate (int32 / 1e7) as orjson writes the float. Returns 1 to ask for the
 * Python path (|value| < 1e-4 but not 0: orjson avoids the exponent, repr does not). */
static int out_coordinate(Out *o, int32_t raw) {
    if (raw == 0) return PUT_LIT(o, "0.0");
    if (raw > -1000 && raw < 1000) return 1;
    char *s = PyOS_double_to_string((double)raw / 1e7, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (s == NULL) return -1;
    int rc = 0;
    if (strchr(s, 'e') != NULL || strchr(s, 'E') != NULL) rc = 1;
    else rc = out_put(o, s, (Py_ssize_t)strlen(s));
    PyMem_Free(s);
    return rc;
}

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int out_base64(Out *o, const unsigned char *p, Py_ssize_t n) {
    if (out_reserve(o, ((n + 2) / 3) * 4) < 0) return -1;
    char *w = o->buf + o->len;
    Py_ssize_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = ((uint32_t)p[i] << 16) | ((uint32_t)p[i + 1] << 8) | p[i + 2];
        *w++ = B64[(v >> 18) & 63];
        *w++ = B64[(v >> 12) & 63];
        *w++ = B64[(v >> 6) & 63];
        *w++ = B64[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)p[i] << 16;
        *w++ = B64[(v >> 18) & 63];
        *w++ = B64[(v >> 12) & 63];
        *w++ = '=';
        *w++ = '=';
    } else if (n - i == 2) {
        uint32_t v = ((uint32_t)p[i] << 16) | ((uint32_t)p[i + 1] << 8);
        *w++ = B64[(v >> 18) & 63];
        *w++ = B64[(v >> 12) & 63];
        *w++ = B64[(v >> 6) & 63];
        *w++ = '=';
    }
    o->len = w - o->buf;
    return 0;
}

/* ms since the epoch -> "YYYY-MM-DDTHH:MM:SS.mmmZ" (24 bytes); ms < MAX_TIMESTAMP_MS. */
static void format_ts(uint64_t ms, char out[24]) {
    uint64_t days = ms / 86400000ULL;
    uint64_t rest = ms % 86400000ULL;
    /* civil_from_days (H. Hinnant), days since 1970-01-01, non-negative here */
    int64_t z = (int64_t)days + 719468;
    int64_t era = z / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t y = yoe + era * 400;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    int64_t d = doy - (153 * mp + 2) / 5 + 1;
    int64_t m = mp < 10 ? mp + 3 : mp - 9;
    if (m <= 2) y += 1;
    unsigned milli = (unsigned)(rest % 1000);
    unsigned secs = (unsigned)(rest / 1000);
    unsigned hh = secs / 3600, mm = (secs / 60) % 60, ss = secs % 60;
    out[0] = (char)('0' + (y / 1000) % 10);
    out[1] = (char)('0' + (y / 100) % 10);
    out[2] = (char)('0' + (y / 10) % 10);
    out[3] = (char)('0' + y % 10);
    out[4] = '-';
    out[5] = (char)('0' + m / 10);
    out[6] = (char)('0' + m % 10);
    out[7] = '-';
    out[8] = (char)('0' + d / 10);
    out[9] = (char)('0' + d % 10);
    out[10] = 'T';
    out[11] = (char)('0' + hh / 10);
    out[12] = (char)('0' + hh % 10);
    out[13] = ':';
    out[14] = (char)('0' + mm / 10);
    out[15] = (char)('0' + mm % 10);
    out[16] = ':';
    out[17] = (char)('0' + ss / 10);
    out[18] = (char)('0' + ss % 10);
    out[19] = '.';
    out[20] = (char)('0' + milli / 100);
    out[21] = (char)('0' + (milli / 10) % 10);
    out[22] = (char)('0' + milli % 10);
    out[23] = 'Z';
}

static inline uint64_t be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

typedef struct {
    const char *name;
    Py_ssize_t name_len;
    int id_size;    /* IO id and event IO id: 1 (Codec 8) or 2 */
    int count_size; /* N, N1..N8, NX: 1 or 2 (Codec 8E) */
    int has_gen;    /* Codec 16: generation type after the event IO id */
    int has_nx;     /* Codec 8E: variable-length group */
} Layout;

static const Layout CODEC8 = {"8", 1, 1, 1, 0, 0};
static const Layout CODEC8E = {"8E", 2, 2, 2, 0, 1};
static const Layout CODEC16 = {"16", 2, 2, 1, 1, 0};

/* Sentinel: not an error, ask the caller to use the Python path. */
#define FALLBACK 1

/* IO ids already in the current record: a 65536-bit set (ids are at most 2 bytes), and
 * the list of ids set in it, to clear them for the next record. Linear in the number of
 * IO elements (a hostile 64 KiB record of 20,000 elements must not cost a quadratic scan). */
typedef struct {
    uint64_t *bits; /* 1024 words */
    unsigned *ids;  /* room for one id per 2 bytes of data */
    Py_ssize_t n;
} Seen;

/* FALLBACK if `id` is already in the record (the Python decoder decides), else remember it. */
static inline int see_id(Seen *seen, unsigned id) {
    uint64_t mask = 1ULL << (id & 63);
    uint64_t *word = &seen->bits[id >> 6];
    if (*word & mask) return FALLBACK;
    *word |= mask;
    seen->ids[seen->n++] = id;
    return 0;
}

static inline void seen_clear(Seen *seen) {
    for (Py_ssize_t i = 0; i < seen->n; i++) seen->bits[seen->ids[i] >> 6] = 0;
    seen->n = 0;
}

/* Decodes one record at *off (bounds: reads must stay below `last`, the offset of number
 * of data 2), appends its tail to `o` and its timestamp to ts. 0, FALLBACK or -1 (error
 * set). */
static int one_record(const unsigned char *d, Py_ssize_t last, Py_ssize_t *offp,
                      const Layout *L, Out *o, char ts[24], Seen *seen) {
    Py_ssize_t off = *offp;
    int ids = L->id_size, cs = L->count_size;
    Py_ssize_t head = 24 + ids + (L->has_gen ? 1 : 0) + cs;
    if (off + head > last) return FALLBACK;
    uint64_t t = be(d + off, 8);
    if (t >= MAX_TIMESTAMP_MS) return FALLBACK;
    unsigned pri = d[off + 8];
    int32_t lon = (int32_t)(uint32_t)be(d + off + 9, 4);
    int32_t lat = (int32_t)(uint32_t)be(d + off + 13, 4);
    int16_t alt = (int16_t)(uint16_t)be(d + off + 17, 2);
    unsigned ang = (unsigned)be(d + off + 19, 2);
    unsigned sat = d[off + 21];
    unsigned spd = (unsigned)be(d + off + 22, 2);
    Py_ssize_t p = off + 24;
    unsigned ev = (unsigned)be(d + p, ids);
    p += ids;
    int gen = -1;
    if (L->has_gen) gen = d[p++];
    uint64_t total = be(d + p, cs);
    p += cs;
    format_ts(t, ts);

    if (PUT_LIT(o, ",\"codec\":\"") < 0) return -1;
    if (out_put(o, L->name, L->name_len) < 0) return -1;
    if (PUT_LIT(o, "\",\"priority\":") < 0 || out_u64(o, pri) < 0) return -1;
    if (PUT_LIT(o, ",\"longitude\":") < 0) return -1;
    int rc = out_coordinate(o, lon);
    if (rc) return rc;
    if (PUT_LIT(o, ",\"latitude\":") < 0) return -1;
    rc = out_coordinate(o, lat);
    if (rc) return rc;
    if (PUT_LIT(o, ",\"altitude\":") < 0 || out_i64(o, alt) < 0) return -1;
    if (PUT_LIT(o, ",\"angle\":") < 0 || out_u64(o, ang) < 0) return -1;
    if (PUT_LIT(o, ",\"satellites\":") < 0 || out_u64(o, sat) < 0) return -1;
    if (PUT_LIT(o, ",\"speed\":") < 0 || out_u64(o, spd) < 0) return -1;
    if (PUT_LIT(o, ",\"event_io_id\":") < 0 || out_u64(o, ev) < 0) return -1;
    if (gen >= 0) {
        if (PUT_LIT(o, ",\"generation_type\":") < 0 || out_u64(o, (uint64_t)gen) < 0) return -1;
    } else if (PUT_LIT(o, ",\"generation_type\":null") < 0) {
        return -1;
    }
    if (PUT_LIT(o, ",\"attributes\":{") < 0) return -1;

    seen_clear(seen);
    uint64_t sum = 0;
    int first = 1;
    static const int widths[4] = {1, 2, 4, 8};
    for (int g = 0; g < 4; g++) {
        int w = widths[g];
        if (p + cs > last) return FALLBACK;
        uint64_t n = be(d + p, cs);
        p += cs;
        sum += n;
        if (n > 65535 || p + (Py_ssize_t)n * (ids + w) > last) return FALLBACK;
        for (uint64_t i = 0; i < n; i++) {
            unsigned id = (unsigned)be(d + p, ids);
            uint64_t v = be(d + p + ids, w);
            p += ids + w;
            if (see_id(seen, id)) return FALLBACK;
            if (!first && PUT_LIT(o, ",") < 0) return -1;
            first = 0;
            if (PUT_LIT(o, "\"") < 0 || out_u64(o, id) < 0 || PUT_LIT(o, "\":") < 0) return -1;
            if (w == 8) {
                if (PUT_LIT(o, "{\"__bigint\":\"") < 0 || out_u64(o, v) < 0 ||
                    PUT_LIT(o, "\"}") < 0)
                    return -1;
            } else if (out_u64(o, v) < 0) {
                return -1;
            }
        }
    }
    if (L->has_nx) {
        if (p + cs > last) return FALLBACK;
        uint64_t n = be(d + p, cs);
        p += cs;
        sum += n;
        for (uint64_t i = 0; i < n; i++) {
            if (p + 4 > last) return FALLBACK;
            unsigned id = (unsigned)be(d + p, 2);
            Py_ssize_t len = (Py_ssize_t)be(d + p + 2, 2);
            p += 4;
            if (p + len > last) return FALLBACK;
            if (see_id(seen, id)) return FALLBACK;
            if (!first && PUT_LIT(o, ",") < 0) return -1;
            first = 0;
            if (PUT_LIT(o, "\"") < 0 || out_u64(o, id) < 0 ||
                PUT_LIT(o, "\":{\"__buffer_b64\":\"") < 0)
                return -1;
            if (out_base64(o, d + p, len) < 0 || PUT_LIT(o, "\"}") < 0) return -1;
            p += len;
        }
    }
    if (sum != total) return FALLBACK;
    if (sat != 0 && (lon != 0 || lat != 0)) {
        if (PUT_LIT(o, "},\"gps_valid\":true") < 0) return -1;
    } else if (PUT_LIT(o, "},\"gps_valid\":false") < 0) {
        return -1;
    }
    *offp = p;
    return 0;
}

static PyObject *payload_parts(PyObject *self, PyObject *arg) {
    (void)self;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "payload_parts() needs bytes");
        return NULL;
    }
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t size = PyBytes_GET_SIZE(arg);
    if (size < 3) goto fallback;
    const Layout *L;
    switch (d[0]) {
    case 0x08: L = &CODEC8; break;
    case 0x8E: L = &CODEC8E; break;
    case 0x10: L = &CODEC16; break;
    default: goto fallback;
    }
    unsigned count = d[1];
    Py_ssize_t last = size - 1;
    if (count == 0 || d[last] != count) goto fallback;

    /* every IO element takes at least 2 bytes (Codec 8: 1-byte id, 1-byte value) */
    Seen seen = {PyMem_Calloc(1024, sizeof(uint64_t)),
                 PyMem_Malloc(sizeof(unsigned) * (size_t)(size / 2 + 1)), 0};
    if (seen.bits == NULL || seen.ids == NULL) {
        PyMem_Free(seen.bits);
        PyMem_Free(seen.ids);
        return PyErr_NoMemory();
    }
    PyObject *parts = PyList_New(2 * (Py_ssize_t)count);
    if (parts == NULL) {
        PyMem_Free(seen.bits);
        PyMem_Free(seen.ids);
        return NULL;
    }
    Out o = {NULL, 0, 0};
    Py_ssize_t off = 2;
    int rc = 0;
    for (unsigned i = 0; i < count; i++) {
        char ts[24];
        o.len = 0;
        rc = one_record(d, last, &off, L, &o, ts, &seen);
        if (rc) break;
        PyObject *t = PyBytes_FromStringAndSize(ts, 24);
        if (t == NULL) {
            rc = -1;
            break;
        }
        PyList_SET_ITEM(parts, 2 * (Py_ssize_t)i, t);
        PyObject *tail = PyBytes_FromStringAndSize(o.buf, o.len);
        if (tail == NULL) {
            rc = -1;
            break;
        }
        PyList_SET_ITEM(parts, 2 * (Py_ssize_t)i + 1, tail);
    }
    PyMem_Free(o.buf);
    PyMem_Free(seen.bits);
    PyMem_Free(seen.ids);
    if (rc == 0 && off != last) rc = FALLBACK;
    if (rc) {
        Py_DECREF(parts);
        if (rc < 0) return NULL;
        goto fallback;
    }
    PyObject *codec = PyUnicode_FromStringAndSize(L->name, L->name_len);
    if (codec == NULL) {
        Py_DECREF(parts);
        return NULL;
    }
    PyObject *result = Py_BuildValue("(NIN)", codec, count, parts);
    return result;

fallback:
    PyErr_SetString(PyExc_ValueError, "not handled by the compiled path");
    return NULL;
}

static PyMethodDef methods[] = {
    {"payload_parts", payload_parts, METH_O,
     "payload_parts(data) -> (codec, count, [ts0, tail0, ts1, tail1, ...]); ValueError when "
     "the Python decoder must decide."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastavl",
    "Compiled Codec 8/8E/16 data field to JSON payload pieces (see _fastavl.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastavl(void) { return PyModule_Create(&module); }
