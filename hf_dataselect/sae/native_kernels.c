/* CPU kernels of SAE encoding, for hf_dataselect.sae.native: the exact top k of every row of a bfloat16 or
 * float32 matrix (hf_dataselect_topk_rows), and the bfloat16 screen of hf_dataselect.sae.screening: its
 * matmul inputs (hf_dataselect_screen_inputs), its selection, float32 recomputation and proof after a
 * PyTorch matmul (hf_dataselect_screened_topk), and on AMX CPUs all of it with the matmul fused
 * (hf_dataselect_amx_screened_topk, at the end of this file). Rows are split over OpenMP threads (PyTorch's,
 * when built with -fopenmp) or POSIX threads; no result depends on the thread count.
 *
 * Top k. Values are compared through an order-preserving unsigned key of their bits (negative numbers have
 * all bits flipped, positive ones the sign bit), so rows are scanned with integer SIMD instructions. With
 * G = ceil(width / 32) groups of strided columns (column c is in group c mod G), per row:
 *
 *   1. the maximum key of every group: an elementwise max of 32 contiguous slices of G keys;
 *   2. T, the k-th largest group maximum. k groups hold a value >= T, so the row's k-th largest value is
 *      >= T: every value of the top k is >= T;
 *   3. the values >= T are the candidates (k to about k + 10 on SAE pre-activations), and theta, the k-th
 *      largest candidate, is the row's k-th largest value;
 *   4. output: every candidate above theta, then the smallest columns among those equal to theta.
 *
 * Selections (2, 3) are a quickselect whose partitions are AVX-512 compress passes, or without AVX-512 a
 * radix select; step 3 scans the whole row with AVX-512 compares, or else only the groups kept in step 2.
 * NaN keys order by their bits (a NaN with the sign bit set ranks below -inf), unlike torch.topk.
 *
 * Build: cc -O3 -march=native -shared -fPIC -pthread [-fopenmp] (hf_dataselect.sae.native does it).
 */
#include <math.h>
#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BW__)
#include <immintrin.h>
#endif

#define GROUP 32
#define UNIT_ROUNDOFF (1.0 / 256.0) /* bfloat16: 2^-8 */

/* Branch-free: the sign bit, copied over all bits by an arithmetic shift, selects what to flip. */
static inline uint32_t key_bf16(uint16_t bits) {
    return (uint16_t)(bits ^ ((uint16_t)((int16_t)bits >> 15) | 0x8000u));
}

static inline uint32_t key_f32(uint32_t bits) { return bits ^ ((uint32_t)((int32_t)bits >> 31) | 0x80000000u); }

#if !defined(__AVX512F__)
/* The k-th largest (1 <= k <= n) of n keys below 2^bits (bits a multiple of 8), by 8-bit radix passes.
 * Four interleaved histograms (`hist`, 4 x 256 counters) keep runs of equal bins from serialising. */
static uint32_t kth_largest_radix(const uint32_t *keys, int64_t n, int64_t k, int bits, uint32_t *hist) {
    uint32_t prefix = 0;
    int64_t above = 0;
    for (int shift = bits - 8; shift >= 0; shift -= 8) {
        memset(hist, 0, 4 * 256 * sizeof(uint32_t));
        if (shift == bits - 8) {
            for (int64_t i = 0; i < n; i++) hist[(i & 3) * 256 + ((keys[i] >> shift) & 255)]++;
        } else {
            for (int64_t i = 0; i < n; i++)
                if ((keys[i] >> (shift + 8)) == prefix) hist[(i & 3) * 256 + (keys[i] >> shift & 255)]++;
        }
        int bin = 255;
        for (;; bin--) {
            int64_t here = (int64_t)hist[bin] + hist[256 + bin] + hist[512 + bin] + hist[768 + bin];
            if (above + here >= k) break;
            above += here;
        }
        prefix = (prefix << 8) | (uint32_t)bin;
    }
    return prefix;
}

#endif

#if defined(__AVX512F__)
/* The k-th largest (1 <= k <= n) of n values by quickselect, each partition one pass of AVX-512 compares and
 * compressions into `work` (2 x (n + 16) values): no branch depends on the data but the loop exits. The larger
 * values go to the buffer that is not the source; the smaller ones are compacted in place (a store never
 * passes the loads), or into the second buffer on the first pass. Defined for unsigned keys and for finite
 * floats. */
#define DEFINE_VECTOR_SELECT(NAME, T, VECTOR, SET1, LOAD, GREATER, LESS, COMPRESS, STORE)                  \
    static T NAME(const T *values, int64_t n, int64_t k, T *work) {                                        \
        const T *source = values;                                                                          \
        T *buffers[2] = {work, work + n + 16};                                                             \
        for (;;) {                                                                                         \
            if (n <= 16) { /* insertion sort, descending */                                                \
                T small[16];                                                                               \
                for (int64_t i = 0; i < n; i++) {                                                          \
                    T value = source[i];                                                                   \
                    int64_t j = i;                                                                         \
                    for (; j > 0 && small[j - 1] < value; j--) small[j] = small[j - 1];                    \
                    small[j] = value;                                                                      \
                }                                                                                          \
                return small[k - 1];                                                                       \
            }                                                                                              \
            T a = source[0], b = source[n / 2], c = source[n - 1];                                         \
            T pivot = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));               \
            const VECTOR pivots = SET1(pivot);                                                             \
            T *greater = buffers[source == buffers[0]], *less = source == values ? buffers[1] : (T *)source; \
            int64_t above = 0, below = 0;                                                                  \
            for (int64_t i = 0; i < n; i += 16) {                                                          \
                __mmask16 valid = i + 16 <= n ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);      \
                VECTOR v = LOAD(valid, source + i);                                                        \
                __mmask16 up = GREATER(valid, v, pivots), down = LESS(valid, v, pivots);                   \
                STORE(greater + above, COMPRESS(up, v));                                                   \
                STORE(less + below, COMPRESS(down, v));                                                    \
                above += __builtin_popcount(up);                                                           \
                below += __builtin_popcount(down);                                                         \
            }                                                                                              \
            if (k <= above) {                                                                              \
                source = greater;                                                                          \
                n = above;                                                                                 \
            } else if (k <= n - below) {                                                                   \
                return pivot;                                                                              \
            } else {                                                                                       \
                k -= n - below;                                                                            \
                source = less;                                                                             \
                n = below;                                                                                 \
            }                                                                                              \
        }                                                                                                  \
    }

#define SET1_U32(value) _mm512_set1_epi32((int)(value))
#define STORE_U32(where, vector) _mm512_storeu_si512((void *)(where), vector)
#define GREATER_F32(mask, a, b) _mm512_mask_cmp_ps_mask(mask, a, b, _CMP_GT_OQ)
#define LESS_F32(mask, a, b) _mm512_mask_cmp_ps_mask(mask, a, b, _CMP_LT_OQ)
DEFINE_VECTOR_SELECT(kth_largest_vector, uint32_t, __m512i, SET1_U32, _mm512_maskz_loadu_epi32,
                     _mm512_mask_cmpgt_epu32_mask, _mm512_mask_cmplt_epu32_mask, _mm512_maskz_compress_epi32,
                     STORE_U32)
DEFINE_VECTOR_SELECT(kth_largest_float, float, __m512, _mm512_set1_ps, _mm512_maskz_loadu_ps, GREATER_F32,
                     LESS_F32, _mm512_maskz_compress_ps, _mm512_storeu_ps)
#endif

/* The k-th largest of n keys below 2^bits: vectorised quickselect with AVX-512; otherwise, when it is among
 * the few smallest (n - k <= 16, the usual case for the candidates), by stepping up through the distinct
 * smallest values, else by radix passes. */
static uint32_t kth_largest(const uint32_t *keys, int64_t n, int64_t k, int bits, uint32_t *hist, uint32_t *work) {
#if defined(__AVX512F__)
    (void)bits;
    (void)hist;
    return kth_largest_vector(keys, n, k, work);
#else
    (void)work;
    int64_t rank = n - k; /* keys strictly below the answer, at most */
    if (rank > 16) return kth_largest_radix(keys, n, k, bits, hist);
    uint32_t floor_value = 0;
    int first = 1;
    for (;;) {
        uint32_t low = UINT32_MAX;
        for (int64_t i = 0; i < n; i++) {
            uint32_t key = keys[i];
            uint32_t eligible = first || key > floor_value;
            low = (eligible && key < low) ? key : low;
        }
        int64_t equal = 0;
        for (int64_t i = 0; i < n; i++) equal += keys[i] == low;
        if (equal > rank) return low;
        rank -= equal;
        floor_value = low;
        first = 0;
    }
#endif
}

typedef struct {
    uint32_t *maxima;
    uint32_t *keys;
    int64_t *columns;
    int64_t *ties;
    int64_t *chosen;
    uint32_t *work;
    uint32_t hist[4 * 256];
} scratch_t;

/* Step 3 over the whole row with AVX-512 compares: the keys >= floor_key and their columns, in column
 * order; their count, or -1 where the CPU lacks AVX-512BW (the caller then scans the kept groups). */
#if defined(__AVX512BW__)
static int64_t collect_bf16(const uint16_t *row, int64_t width, uint32_t floor_key, scratch_t *s) {
    const __m512i sign = _mm512_set1_epi16((short)0x8000), floor_vector = _mm512_set1_epi16((short)floor_key);
    int64_t count = 0, c = 0;
    for (; c + 32 <= width; c += 32) {
        __m512i bits = _mm512_loadu_si512((const void *)(row + c));
        __m512i keys = _mm512_xor_si512(bits, _mm512_or_si512(_mm512_srai_epi16(bits, 15), sign));
        for (__mmask32 hits = _mm512_cmpge_epu16_mask(keys, floor_vector); hits; hits &= hits - 1) {
            int64_t column = c + __builtin_ctz(hits);
            s->keys[count] = key_bf16(row[column]);
            s->columns[count++] = column;
        }
    }
    for (; c < width; c++) {
        s->keys[count] = key_bf16(row[c]);
        s->columns[count] = c;
        count += s->keys[count] >= floor_key;
    }
    return count;
}

static int64_t collect_f32(const uint32_t *row, int64_t width, uint32_t floor_key, scratch_t *s) {
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u), floor_vector = _mm512_set1_epi32((int)floor_key);
    int64_t count = 0, c = 0;
    for (; c + 16 <= width; c += 16) {
        __m512i bits = _mm512_loadu_si512((const void *)(row + c));
        __m512i keys = _mm512_xor_si512(bits, _mm512_or_si512(_mm512_srai_epi32(bits, 31), sign));
        for (__mmask16 hits = _mm512_cmpge_epu32_mask(keys, floor_vector); hits; hits &= hits - 1) {
            int64_t column = c + __builtin_ctz(hits);
            s->keys[count] = key_f32(row[column]);
            s->columns[count++] = column;
        }
    }
    for (; c < width; c++) {
        s->keys[count] = key_f32(row[c]);
        s->columns[count] = c;
        count += s->keys[count] >= floor_key;
    }
    return count;
}
#else
#define collect_bf16(row, width, floor_key, s) (-1)
#define collect_f32(row, width, floor_key, s) (-1)
#endif

static int compare_packed(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

#define POSITION_BITS 24

/* Step 4: positions (into keys/columns) of the k largest keys: those above theta (the k-th largest), then
 * those equal to it with the smallest columns. `ties` holds `count` packed (column, position) pairs. */
static void choose_top(const uint32_t *keys, const int64_t *columns, int64_t count, int64_t k, uint32_t theta,
                       int64_t *chosen, int64_t *ties) {
    int64_t out = 0, tied = 0;
    for (int64_t i = 0; i < count; i++) {
        if (keys[i] > theta) chosen[out++] = i;
        else if (keys[i] == theta) ties[tied++] = (columns[i] << POSITION_BITS) | i;
    }
    if (out + tied > k) qsort(ties, tied, sizeof(int64_t), compare_packed);
    for (int64_t i = 0; out < k; i++) chosen[out++] = ties[i] & ((1 << POSITION_BITS) - 1);
}

#define DEFINE_ROW_TOPK(NAME, VALUE_T, KEY, KEY_BITS, COLLECT)                                             \
    static void NAME(const VALUE_T *row, int64_t width, int64_t k, VALUE_T *values, int64_t *indices,     \
                     scratch_t *s) {                                                                       \
        int64_t groups = (width + GROUP - 1) / GROUP, full = width / groups;                               \
        VALUE_T *maxima = (VALUE_T *)s->maxima; /* keys as wide as the values: more SIMD lanes */         \
        for (int64_t j = 0; j < groups; j++) maxima[j] = (VALUE_T)KEY(row[j]);                             \
        for (int64_t m = 1; m < full; m++) {                                                               \
            const VALUE_T *slice = row + m * groups;                                                       \
            for (int64_t j = 0; j < groups; j++) {                                                         \
                VALUE_T key = (VALUE_T)KEY(slice[j]);                                                      \
                maxima[j] = key > maxima[j] ? key : maxima[j];                                             \
            }                                                                                              \
        }                                                                                                  \
        for (int64_t c = full * groups; c < width; c++) {                                                  \
            VALUE_T key = (VALUE_T)KEY(row[c]);                                                            \
            int64_t j = c - full * groups;                                                                 \
            maxima[j] = key > maxima[j] ? key : maxima[j];                                                 \
        }                                                                                                  \
        uint32_t floor_key = 0;                                                                            \
        if (groups > k) {                                                                                  \
            for (int64_t j = 0; j < groups; j++) s->keys[j] = maxima[j];                                   \
            floor_key = kth_largest(s->keys, groups, k, KEY_BITS, s->hist, s->work);                       \
        }                                                                                                  \
        int64_t count = COLLECT(row, width, floor_key, s);                                                 \
        if (count < 0) {                                                                                   \
            count = 0;                                                                                     \
            for (int64_t j = 0; j < groups; j++) {                                                         \
                if (maxima[j] < floor_key) continue;                                                       \
                for (int64_t c = j; c < width; c += groups) {                                              \
                    uint32_t key = KEY(row[c]);                                                            \
                    s->keys[count] = key;                                                                  \
                    s->columns[count] = c;                                                                 \
                    count += key >= floor_key;                                                             \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        uint32_t theta = kth_largest(s->keys, count, k, KEY_BITS, s->hist, s->work);                       \
        choose_top(s->keys, s->columns, count, k, theta, s->chosen, s->ties);                              \
        for (int64_t j = 0; j < k; j++) {                                                                  \
            indices[j] = s->columns[s->chosen[j]];                                                         \
            values[j] = row[indices[j]];                                                                   \
        }                                                                                                  \
    }

DEFINE_ROW_TOPK(row_topk_bf16, uint16_t, key_bf16, 16, collect_bf16)
DEFINE_ROW_TOPK(row_topk_f32, uint32_t, key_f32, 32, collect_f32)

/* Rows [first, last) of a job; returns 0, or -1 when memory could not be had. */
typedef int (*rows_fn)(void *context, int64_t first, int64_t last);

#ifndef _OPENMP
typedef struct {
    rows_fn fn;
    void *context;
    int64_t first, last;
    int status;
} slice_t;

static void *run_slice(void *arg) {
    slice_t *slice = (slice_t *)arg;
    slice->status = slice->fn(slice->context, slice->first, slice->last);
    return NULL;
}
#endif

/* fn over n rows split into `threads` contiguous slices. With OpenMP, in the process's OpenMP runtime: in
 * PyTorch's (the same libgomp.so.1), whose worker threads are still spinning after PyTorch's last parallel
 * region and would otherwise compete with threads of our own for the cores. Without it, POSIX threads (the
 * caller runs the first slice). */
static int parallel_rows(rows_fn fn, void *context, int64_t n, int threads) {
    if (threads > n) threads = n > 0 ? (int)n : 1;
    if (threads < 1) threads = 1;
#ifdef _OPENMP
    int status = 0;
#pragma omp parallel num_threads(threads) reduction(| : status)
    {
        const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
        status |= fn(context, n * t / count, n * (t + 1) / count) != 0;
    }
    return status ? -1 : 0;
#else
    slice_t *slices = calloc(threads, sizeof(slice_t));
    pthread_t *handles = calloc(threads, sizeof(pthread_t));
    int *started = calloc(threads, sizeof(int));
    int status = (slices && handles && started) ? 0 : -1;
    for (int t = 0; status == 0 && t < threads; t++) {
        slices[t] = (slice_t){fn, context, n * t / threads, n * (t + 1) / threads, 0};
        if (t > 0) started[t] = pthread_create(&handles[t], NULL, run_slice, &slices[t]) == 0;
    }
    if (status == 0) {
        run_slice(&slices[0]);
        for (int t = 1; t < threads; t++) {
            if (started[t]) pthread_join(handles[t], NULL);
            else run_slice(&slices[t]);
        }
        for (int t = 0; t < threads; t++)
            if (slices[t].status != 0) status = -1;
    }
    free(slices);
    free(handles);
    free(started);
    return status;
#endif
}

typedef struct {
    const void *scores;
    int64_t width, k;
    void *values;
    int64_t *indices;
    int is_bf16;
} topk_job_t;

static void free_scratch(scratch_t *s) {
    if (!s) return;
    free(s->maxima);
    free(s->keys);
    free(s->columns);
    free(s->ties);
    free(s->chosen);
    free(s->work);
    free(s);
}

/* Scratch for rows of `width` values; NULL when memory could not be had. */
static scratch_t *new_scratch(int64_t width) {
    scratch_t *s = calloc(1, sizeof(scratch_t));
    int64_t room = width + 1;
    if (!s) return NULL;
    s->maxima = malloc(room * sizeof(uint32_t));
    s->keys = malloc(room * sizeof(uint32_t));
    s->columns = malloc(room * sizeof(int64_t));
    s->ties = malloc(room * sizeof(int64_t));
    s->chosen = malloc(room * sizeof(int64_t));
    s->work = malloc(2 * (room + 16) * sizeof(uint32_t));
    if (s->maxima && s->keys && s->columns && s->ties && s->chosen && s->work) return s;
    free_scratch(s);
    return NULL;
}

static int topk_slice(void *context, int64_t first, int64_t last) {
    topk_job_t *job = (topk_job_t *)context;
    scratch_t *s = new_scratch(job->width);
    if (!s) return -1;
    for (int64_t r = first; r < last; r++) {
        if (job->is_bf16)
            row_topk_bf16((const uint16_t *)job->scores + r * job->width, job->width, job->k,
                          (uint16_t *)job->values + r * job->k, job->indices + r * job->k, s);
        else
            row_topk_f32((const uint32_t *)job->scores + r * job->width, job->width, job->k,
                         (uint32_t *)job->values + r * job->k, job->indices + r * job->k, s);
    }
    free_scratch(s);
    return 0;
}

/* Top k (1 <= k <= width) of each of the n contiguous rows of `scores` (bfloat16 bits when is_bf16, else
 * float32) into values [n, k] and indices [n, k]. Returns 0, or -1 when memory could not be had. */
int hf_dataselect_topk_rows(const void *scores, int is_bf16, int64_t n, int64_t width, int64_t k,
                            void *values, int64_t *indices, int threads) {
    topk_job_t job = {scores, width, k, values, indices, is_bf16};
    return parallel_rows(topk_slice, &job, n, threads);
}

/* Sums of 16 lanes, pairwise: 4 dependent adds, not 15. */
static inline float lane_sum(float *lanes) {
    for (int width = 8; width >= 1; width /= 2)
        for (int l = 0; l < width; l++) lanes[l] += lanes[l + width];
    return lanes[0];
}

/* out[j] = weight[latents[j]] · x + bias[latents[j]] for j < m, in float32. Each dot product is summed in 16
 * independent lanes (vectorised without reassociation), then pairwise, so its value never depends on how
 * the loop is blocked; four run side by side to overlap their loads and multiply-add latencies. */
static void gathered_dots(const float *x, const float *weight, const float *bias, const int64_t *latents,
                          int64_t m, int64_t d, float *out) {
    const int64_t body = d - d % 16;
    int64_t j = 0;
    for (; j + 4 <= m; j += 4) {
        const float *w0 = weight + latents[j] * d, *w1 = weight + latents[j + 1] * d;
        const float *w2 = weight + latents[j + 2] * d, *w3 = weight + latents[j + 3] * d;
        float a0[16] = {0}, a1[16] = {0}, a2[16] = {0}, a3[16] = {0};
        for (int64_t i = 0; i < body; i += 16) {
            for (int l = 0; l < 16; l++) {
                a0[l] += x[i + l] * w0[i + l];
                a1[l] += x[i + l] * w1[i + l];
                a2[l] += x[i + l] * w2[i + l];
                a3[l] += x[i + l] * w3[i + l];
            }
        }
        float s0 = lane_sum(a0), s1 = lane_sum(a1), s2 = lane_sum(a2), s3 = lane_sum(a3);
        for (int64_t i = body; i < d; i++) {
            s0 += x[i] * w0[i];
            s1 += x[i] * w1[i];
            s2 += x[i] * w2[i];
            s3 += x[i] * w3[i];
        }
        out[j] = s0 + bias[latents[j]];
        out[j + 1] = s1 + bias[latents[j + 1]];
        out[j + 2] = s2 + bias[latents[j + 2]];
        out[j + 3] = s3 + bias[latents[j + 3]];
    }
    for (; j < m; j++) {
        const float *w = weight + latents[j] * d;
        float lanes[16] = {0};
        for (int64_t i = 0; i < body; i += 16)
            for (int l = 0; l < 16; l++) lanes[l] += x[i + l] * w[i + l];
        float sum = lane_sum(lanes);
        for (int64_t i = body; i < d; i++) sum += x[i] * w[i];
        out[j] = sum + bias[latents[j]];
    }
}

typedef struct {
    const uint16_t *scores;
    int64_t width, candidates;
    const float *x, *shift, *weight, *bias;
    int64_t d, k;
    float *values;
    int64_t *indices;
    uint8_t *proven;
} screen_job_t;

static inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof(value));
    return value;
}

static inline uint32_t float_key(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof(bits));
    return key_f32(bits);
}

/* Step 3 for one row, given its m candidate latents and their scores: float32 pre-activations
 * weight[l] · (x - shift) + bias[l] of the candidates (into `exact`; `shifted` holds x - shift when shift is
 * not NULL), their top k (values clamped at 0), and whether the
 * bound of the smallest candidate score c, c + rounding |c|, proves that no other latent is in the top k (it
 * is below the k-th value, or at most 0). rounding = u/(1-u) with u = 2^-8 for scores rounded to bfloat16,
 * 0 for the float32 accumulations themselves (the bound columns already cover their rounding). */
static int finish_row(const float *scores, const int64_t *latents, int64_t m, const float *x, const float *shift,
                      const float *weight, const float *bias, int64_t d, int64_t k, double rounding, float *exact,
                      float *shifted, scratch_t *s, float *values, int64_t *indices) {
    float smallest = scores[0];
    for (int64_t j = 1; j < m; j++) smallest = scores[j] < smallest ? scores[j] : smallest;
    if (shift) { /* x - shift exactly as PyTorch computes it, without a [tokens, d] copy */
        for (int64_t i = 0; i < d; i++) shifted[i] = x[i] - shift[i];
        x = shifted;
    }
    gathered_dots(x, weight, bias, latents, m, d, exact);
    for (int64_t j = 0; j < m; j++) s->keys[j] = float_key(exact[j]);
    uint32_t theta = kth_largest(s->keys, m, k, 32, s->hist, s->work);
    choose_top(s->keys, latents, m, k, theta, s->chosen, s->ties);
    float kth = exact[s->chosen[0]];
    for (int64_t j = 0; j < k; j++) {
        float value = exact[s->chosen[j]];
        kth = value < kth ? value : kth;
        values[j] = value > 0.0f ? value : 0.0f;
        indices[j] = latents[s->chosen[j]];
    }
    double bound = (double)smallest + rounding * fabs((double)smallest);
    return bound < (double)kth || bound <= 0.0;
}

static int screen_slice(void *context, int64_t first, int64_t last) {
    screen_job_t *job = (screen_job_t *)context;
    const int64_t m = job->candidates, k = job->k;
    scratch_t *s = new_scratch(job->width);
    uint16_t *bits = malloc(m * sizeof(uint16_t));
    float *scores = malloc(m * sizeof(float));
    int64_t *latents = malloc(m * sizeof(int64_t));
    float *exact = malloc(m * sizeof(float));
    float *shifted = malloc(job->d * sizeof(float));
    int ok = s && bits && scores && latents && exact && shifted;
    for (int64_t r = first; ok && r < last; r++) {
        row_topk_bf16(job->scores + r * job->width, job->width, m, bits, latents, s);
        for (int64_t j = 0; j < m; j++) scores[j] = bf16_to_float(bits[j]);
        job->proven[r] = finish_row(scores, latents, m, job->x + r * job->d, job->shift, job->weight, job->bias,
                                    job->d, k, UNIT_ROUNDOFF / (1.0 - UNIT_ROUNDOFF), exact, shifted, s,
                                    job->values + r * k, job->indices + r * k);
    }
    free_scratch(s);
    free(bits);
    free(scores);
    free(latents);
    free(exact);
    free(shifted);
    return ok ? 0 : -1;
}

/* Steps 2 and 3 of hf_dataselect.sae.screening, per row r of n: the top `candidates` latents by bfloat16
 * score (scores [n, width]), their float32 pre-activations weight[l] · (x[r] - shift) + bias[l] (x [n, d],
 * shift [d] or NULL, weight [width, d]), the top k of those into values [n, k] (clamped at 0) and indices [n, k], and proven[r]: the
 * bound of the smallest candidate score, c + u/(1-u)|c| with u = 2^-8, is below the k-th float32 value or at
 * most 0 (then no other latent can be in the top k). Returns 0, or -1 when memory could not be had. */
int hf_dataselect_screened_topk(const uint16_t *scores, int64_t n, int64_t width, int64_t candidates,
                                const float *x, const float *shift, const float *weight, const float *bias,
                                int64_t d, int64_t k, float *values, int64_t *indices, uint8_t *proven,
                                int threads) {
    screen_job_t job = {scores, width, candidates, x, shift, weight, bias, d, k, values, indices, proven};
    return parallel_rows(screen_slice, &job, n, threads);
}

/* Round to the nearest bfloat16, ties to even (as PyTorch converts; inputs are finite). */
static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof(bits));
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

typedef struct {
    const float *x;
    int64_t d, stride;
    double inflate;
    uint16_t *augmented;
} inputs_job_t;

/* One row of step 1's inputs: out[0, stride) = [bf16(x), 1, ‖bf16([x, 1])‖·inflate, ‖x − bf16(x)‖·inflate, 0...].
 * The norms are float32 sums in 16 independent lanes (vectorised); their relative error, below
 * (d / 16 + 5) 2^-24, is covered by the 1 % slack in `inflate` (screening.SAFETY), as in the PyTorch path. */
static void augment_row(const float *x, int64_t d, int64_t stride, double inflate, uint16_t *out) {
    float rounded_lanes[16] = {0}, error_lanes[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
        for (int l = 0; l < 16; l++) {
            const uint16_t bits = float_to_bf16(x[i + l]);
            const float rounded = bf16_to_float(bits), error = x[i + l] - rounded; /* exact in float32 */
            out[i + l] = bits;
            rounded_lanes[l] += rounded * rounded;
            error_lanes[l] += error * error;
        }
    }
    double rounded_sq = 1.0, error_sq = 0.0; /* the constant 1 column is exact */
    for (; i < d; i++) {
        const uint16_t bits = float_to_bf16(x[i]);
        const float rounded = bf16_to_float(bits), error = x[i] - rounded;
        out[i] = bits;
        rounded_sq += (double)rounded * rounded;
        error_sq += (double)error * error;
    }
    for (int l = 0; l < 16; l++) {
        rounded_sq += rounded_lanes[l];
        error_sq += error_lanes[l];
    }
    out[d] = 0x3F80; /* 1.0 */
    out[d + 1] = float_to_bf16((float)(sqrt(rounded_sq) * inflate));
    out[d + 2] = float_to_bf16((float)(sqrt(error_sq) * inflate));
    for (int64_t j = d + 3; j < stride; j++) out[j] = 0;
}

static int inputs_slice(void *context, int64_t first, int64_t last) {
    inputs_job_t *job = (inputs_job_t *)context;
    for (int64_t r = first; r < last; r++)
        augment_row(job->x + r * job->d, job->d, job->stride, job->inflate, job->augmented + r * job->stride);
    return 0;
}

/* Step 1's inputs of hf_dataselect.sae.screening for x [n, d] (float32): augmented [n, stride >= d + 3]
 * (bfloat16 bits) = [bf16(x), 1, norm(bf16([x, 1])) * inflate, norm(x - bf16(x)) * inflate, 0...], the norms
 * rounded to nearest (inflate includes the 2^-7 that makes them upper bounds after rounding). Returns 0, or
 * -1 when memory could not be had. */
int hf_dataselect_screen_inputs(const float *x, int64_t n, int64_t d, int64_t stride, double inflate,
                                uint16_t *augmented, int threads) {
    inputs_job_t job = {x, d, stride, inflate, augmented};
    return parallel_rows(inputs_slice, &job, n, threads);
}

/* ---------------------------------------------------------------------------------------------------------
 * Steps 1 to 3 fused on AMX tiles (Intel Sapphire Rapids and later): the bfloat16 scores are accumulated in
 * tiles of 16 tokens x 16 latents and go straight into a running top-m per token, so the [tokens, latents]
 * score matrix is never written to memory (writing and re-reading it cost more than the matmul itself).
 *
 * Scores here are the float32 accumulations, not rounded to bfloat16 as the matmul's output is elsewhere, so
 * the proof needs no rounding term u/(1-u)|c|: a score is itself an upper bound of the exact pre-activation,
 * as the bound columns cover the float32 accumulation in any order (gamma counts every rounding of a sum of d + 3 products; AMX rounds each pair
 * sum and each accumulation, and the inputs' zero padding adds nothing). AMX treats bfloat16 subnormals as
 * zero; their products are below 2^-126 times a weight, far inside the 1 % slack (SAFETY) of bound columns
 * that are at least gamma times the norms, and the input norm is at least 1 (the constant column).
 * ------------------------------------------------------------------------------------------------------- */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_TOKENS 16       /* rows of a tile */
#define AMX_LATENTS 32      /* two tiles of 16 latents per group */
#define AMX_ROOM 192        /* running candidates beyond m before a compaction */
#define AMX_BLOCK_PAIRS 8   /* token tile pairs sharing one pass over the weights (256 tokens) */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config_t;

/* Running top m of one token: everything above `floor` since the last compaction, at most `room`. */
typedef struct {
    float floor;
    int64_t count;
    float *scores;
    int32_t *latents;
} running_t;

/* Keep the m largest scores of a running set (among scores equal to the m-th, the earliest; the proof only
 * needs the smallest kept score) and raise its floor to the m-th largest. In place: a kept entry only moves
 * toward the front. Scores in a running set are finite (NaN never passes the floor). */
static void compact(running_t *run, int64_t m, scratch_t *s) {
    if (run->count <= m) return;
    const float theta = kth_largest_float(run->scores, run->count, m, (float *)s->work);
    int64_t above = 0;
    for (int64_t i = 0; i < run->count; i++) above += run->scores[i] > theta;
    int64_t kept = 0, ties = m - above;
    for (int64_t i = 0; i < run->count; i++) {
        const int keep = run->scores[i] > theta || (run->scores[i] == theta && ties-- > 0);
        run->scores[kept] = run->scores[i];
        run->latents[kept] = run->latents[i];
        kept += keep;
    }
    run->count = m;
    run->floor = theta;
}

typedef struct {
    const uint16_t *packed;
    int64_t n, kp, latents, m;
    const void *x; /* float32, or bfloat16 bits when x_bf16 (a bfloat16 model's hidden states, read as is) */
    int x_bf16;
    const float *shift, *weight, *bias;
    int64_t d, k;
    double inflate;
    float *values;
    int64_t *indices;
    uint8_t *proven;
} amx_job_t;

/* Add the scores above the floor among 16 latents (base, base + 1, ...) to a running set: compressed in
 * registers and stored whole (the sets have 16 entries of slack), faster than compressing into memory. */
static inline void add_above(running_t *run, __m512 scores, __mmask16 above, int32_t base) {
    const __m512i latents = _mm512_add_epi32(_mm512_set1_epi32(base),
                                             _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    _mm512_storeu_ps(run->scores + run->count, _mm512_maskz_compress_ps(above, scores));
    _mm512_storeu_si512((void *)(run->latents + run->count), _mm512_maskz_compress_epi32(above, latents));
    run->count += __builtin_popcount(above);
}

/* Offer one token's scores of a 32-latent group (two rows of 16, lanes outside `exists` ignored) to its
 * running set, compacting it first when it could overflow `room`. One branch when nothing is above the
 * floor, the usual case once the floor has risen. */
static inline void offer(running_t *run, const float *first16, const float *second16, int64_t base,
                         __mmask16 exists0, __mmask16 exists1, int64_t m, int64_t room, scratch_t *s) {
    const __m512 floor = _mm512_set1_ps(run->floor);
    const __m512 scores0 = _mm512_loadu_ps(first16), scores1 = _mm512_loadu_ps(second16);
    const __mmask16 above0 = _mm512_mask_cmp_ps_mask(exists0, scores0, floor, _CMP_GT_OQ);
    const __mmask16 above1 = _mm512_mask_cmp_ps_mask(exists1, scores1, floor, _CMP_GT_OQ);
    if (!(above0 | above1)) return;
    if (run->count + 32 > room) compact(run, m, s); /* the floor rises: test again */
    const __m512 raised = _mm512_set1_ps(run->floor);
    add_above(run, scores0, _mm512_mask_cmp_ps_mask(above0, scores0, raised, _CMP_GT_OQ), (int32_t)base);
    add_above(run, scores1, _mm512_mask_cmp_ps_mask(above1, scores1, raised, _CMP_GT_OQ), (int32_t)base + 16);
}

/* Token tiles are taken in pairs and latents in pairs of tiles: per 32-column step two token tiles and two
 * weight tiles are loaded for four tile products (each load serves two products). */
/* Row r of the job's x as float32: in place, or widened from bfloat16 into `buffer` (exactly). */
static const float *float_row(const amx_job_t *job, int64_t r, float *buffer) {
    if (!job->x_bf16) return (const float *)job->x + r * job->d;
    const uint16_t *row = (const uint16_t *)job->x + r * job->d;
    for (int64_t i = 0; i < job->d; i++) buffer[i] = bf16_to_float(row[i]);
    return buffer;
}

static int amx_slice(void *context, int64_t first_pair, int64_t last_pair) {
    amx_job_t *job = (amx_job_t *)context;
    const int64_t m = job->m, kp = job->kp, steps = kp / 32, room = m + AMX_ROOM;
    const int64_t groups = (job->latents + AMX_LATENTS - 1) / AMX_LATENTS;
    const int64_t block = AMX_BLOCK_PAIRS * 2 * AMX_TOKENS;
    scratch_t *s = new_scratch(room > job->latents ? room : job->latents);
    running_t *runs = calloc(block, sizeof(running_t));
    const int64_t stride = room + 16; /* slack for whole-vector stores */
    float *pool_scores = malloc(block * stride * sizeof(float));
    int32_t *pool_latents = malloc(block * stride * sizeof(int32_t));
    float *exact = malloc(m * sizeof(float));
    float *shifted = malloc(job->d * sizeof(float)), *row_buffer = malloc(job->d * sizeof(float));
    uint16_t *inputs = aligned_alloc(64, block * kp * sizeof(uint16_t)); /* this block's step 1 inputs */
    float out[2][2][2][AMX_TOKENS][16]; /* [pair parity][token tile][latent tile][row][latent] */
    int ok = s && runs && pool_scores && pool_latents && exact && shifted && row_buffer && inputs;
    if (!ok) goto done;

    tile_config_t config = {0};
    config.palette_id = 1;
    for (int t = 0; t < 8; t++) { /* 0-3: scores, 4-5: tokens, 6-7: weights; all 16 rows of 64 bytes */
        config.rows[t] = AMX_TOKENS;
        config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);

    for (int64_t block_first = first_pair; block_first < last_pair; block_first += AMX_BLOCK_PAIRS) {
        const int64_t block_last = block_first + AMX_BLOCK_PAIRS < last_pair ? block_first + AMX_BLOCK_PAIRS : last_pair;
        const int64_t first_token = block_first * 2 * AMX_TOKENS;
        const int64_t tokens = (block_last - block_first) * 2 * AMX_TOKENS;
        for (int64_t t = 0; t < tokens; t++) {
            runs[t] = (running_t){-INFINITY, 0, pool_scores + t * stride, pool_latents + t * stride};
            if (first_token + t < job->n)
                augment_row(float_row(job, first_token + t, row_buffer), job->d, kp, job->inflate, inputs + t * kp);
            else
                memset(inputs + t * kp, 0, kp * sizeof(uint16_t));
        }
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *w0 = job->packed + (2 * g) * steps * 512, *w1 = w0 + steps * 512;
            const int64_t valid = job->latents - g * AMX_LATENTS; /* latents of this group that exist */
            const __mmask16 exists0 = valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
            const __mmask16 exists1 =
                valid >= 32 ? (__mmask16)0xFFFF : (valid <= 16 ? 0 : (__mmask16)((1u << (valid - 16)) - 1));
            /* the scores of a pair are offered while the next pair's products run: a load right after
             * the tile stores would wait for them */
            for (int64_t pair = block_first; pair <= block_last; pair++) {
                if (pair < block_last) {
                    const uint16_t *a0 = inputs + (pair - block_first) * 2 * AMX_TOKENS * kp;
                    const uint16_t *a1 = a0 + AMX_TOKENS * kp;
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    for (int64_t step = 0; step < steps; step++) {
                        _tile_loadd(4, a0 + step * 32, kp * 2);
                        _tile_loadd(6, w0 + step * 512, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_loadd(7, w1 + step * 512, 64);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_loadd(5, a1 + step * 32, kp * 2);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                }
                if (pair > block_first) {
                    float(*previous)[2][AMX_TOKENS][16] = out[(pair - 1) & 1];
                    for (int half = 0; half < 2; half++) {
                        running_t *first_run = &runs[(pair - 1 - block_first) * 2 * AMX_TOKENS + half * AMX_TOKENS];
                        for (int64_t row = 0; row < AMX_TOKENS; row++)
                            offer(&first_run[row], previous[half][0][row], previous[half][1][row], g * AMX_LATENTS,
                                  exists0, exists1, m, room, s);
                    }
                }
                if (pair < block_last) {
                    _tile_stored(0, out[pair & 1][0][0], 64);
                    _tile_stored(1, out[pair & 1][0][1], 64);
                    _tile_stored(2, out[pair & 1][1][0], 64);
                    _tile_stored(3, out[pair & 1][1][1], 64);
                }
            }
        }
        for (int64_t t = 0; t < tokens; t++) {
            const int64_t r = first_token + t;
            if (r >= job->n) break;
            running_t *run = &runs[t];
            compact(run, m, s);
            if (run->count < m) { /* fewer than m finite scores (non-finite inputs): left to the fallback */
                job->proven[r] = 0;
                memset(job->values + r * job->k, 0, job->k * sizeof(float));
                memset(job->indices + r * job->k, 0, job->k * sizeof(int64_t));
                continue;
            }
            for (int64_t j = 0; j < m; j++) s->columns[j] = run->latents[j];
            job->proven[r] = finish_row(run->scores, s->columns, m, float_row(job, r, row_buffer), job->shift,
                                        job->weight, job->bias, job->d, job->k, 0.0, exact, shifted, s,
                                        job->values + r * job->k, job->indices + r * job->k);
        }
    }
    _tile_release();
done:
    free_scratch(s);
    free(runs);
    free(pool_scores);
    free(pool_latents);
    free(exact);
    free(shifted);
    free(row_buffer);
    free(inputs);
    return ok ? 0 : -1;
}

/* 1 when AMX tiles can be used by this process (asks the kernel for permission, as oneDNN does). */
static int amx_ready(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}
#endif

/* Steps 1 to 3 of hf_dataselect.sae.screening on AMX tiles for x [n, d] (float32, or bfloat16 when x_bf16,
 * widened exactly): step 1's inputs (as
 * hf_dataselect_screen_inputs, with `inflate`, zero-padded to kp columns, a multiple of 32) are built per
 * block of 256 tokens; packed = the augmented weights [latents rounded up to 32, kp] zero-padded and laid out
 * per 16-latent tile and 32-column step as AMX reads them ([tile][step][16 column pairs][16 latents][2]);
 * m candidates per token; then as hf_dataselect_screened_topk. Returns 0, -1 when memory could not be had,
 * -2 where AMX is not available. */
int hf_dataselect_amx_screened_topk(const uint16_t *packed, int64_t n, int64_t kp, int64_t latents, int64_t m,
                                    const void *x, int x_bf16, const float *shift, const float *weight,
                                    const float *bias, int64_t d, int64_t k, double inflate, float *values,
                                    int64_t *indices, uint8_t *proven, int threads) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)
    if (kp % 32 != 0 || kp < d + 3 || m > latents || !amx_ready()) return -2;
    amx_job_t job = {packed, n,      kp,   latents, m, x,      x_bf16,  shift,
                     weight, bias,   d,    k,       inflate,   values, indices, proven};
    return parallel_rows(amx_slice, &job, (n + 2 * AMX_TOKENS - 1) / (2 * AMX_TOKENS), threads);
#else
    (void)packed, (void)n, (void)kp, (void)latents, (void)m, (void)x, (void)x_bf16, (void)shift, (void)weight;
    (void)bias;
    (void)d, (void)k, (void)inflate, (void)values, (void)indices, (void)proven, (void)threads;
    return -2;
#endif
}

/* 1 where hf_dataselect_amx_screened_topk runs (built for a CPU with AMX, and the process may use it). */
int hf_dataselect_has_amx(void) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)
    return amx_ready();
#else
    return 0;
#endif
}

/* 1 when the n bytes at a and b are the same (memcmp: one pass at memory bandwidth, bit for bit). */
int hf_dataselect_same_bytes(const void *a, const void *b, int64_t n) { return memcmp(a, b, (size_t)n) == 0; }
