/* Region-of-interest JPEG decode with libjpeg-turbo (data.decode.decoder=libjpeg_roi, docs/decode.md).
 *
 * The training crop (RandomResizedCrop) covers about half of the image on average. libjpeg-turbo can
 * skip the inverse DCT, upsampling and colour conversion outside a window: jpeg_crop_scanline() limits
 * the columns (widened to the iMCU grid), jpeg_skip_scanlines() skips the rows above the window (their
 * entropy-coded data is still parsed: JPEG has no row index), and the rows below it are never read.
 * No installable Python library exposes this (simplejpeg, OpenCV, Pillow and torchvision decode whole
 * images; PyTurboJPEG needs TurboJPEG 3, which Debian bookworm lacks, and only crops losslessly), hence
 * this small binding. It uses only the libjpeg API of libjpeg-turbo (>= 1.5 has these calls; decode.py uses
 * it only with >= 2.1.5, the release it was tested with).
 *
 * decode_crop(data, top, left, height, width, fast[, max_pixels, max_scans, max_memory])
 *     -> (bytearray, x0, out_width)
 *   RGB rows top .. top+height-1, columns x0 .. x0+out_width-1 (x0 <= left, x0 + out_width >=
 *   left + width: the iMCU-aligned columns that libjpeg delivered), 3 bytes per pixel.
 *   fast: libjpeg-turbo's fast integer IDCT and plain (non-fancy) chroma upsampling, as simplejpeg's
 *   fastdct/fastupsample. Raises ValueError on any libjpeg error or warning (corrupt data, CMYK), so the
 *   caller can fall back to another decoder. Raises LimitError (no fallback: the file is bad) for an
 *   image of more than max_pixels pixels (checked right after the header), a JPEG of more than max_scans
 *   scans (checked by a progress monitor as each scan starts, as djpeg -maxscans does), or one that needs
 *   more than max_memory bytes of libjpeg's memory (cinfo->mem->max_memory_to_use: a progressive file's
 *   coefficient buffer above it fails with "backing store not supported" instead of being allocated).
 *
 * LIBJPEG_TURBO_VERSION_NUMBER is the version of the headers it was built with; LIBJPEG_PATH is the file of
 * the libjpeg actually loaded (dladdr), which decode.py reads its version from.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

static PyObject *LimitError;

struct roi_error {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
    int limit; /* the error is a limit (LimitError), not corrupt data (ValueError) */
};

struct roi_progress {
    struct jpeg_progress_mgr pub;
    int max_scans;
};

static void roi_progress_monitor(j_common_ptr cinfo) {
    struct roi_progress *prog = (struct roi_progress *)cinfo->progress;
    int scan = ((j_decompress_ptr)cinfo)->input_scan_number;
    if (scan > prog->max_scans) {
        struct roi_error *err = (struct roi_error *)cinfo->err;
        snprintf(err->message, sizeof err->message, "JPEG with more than %d scans", prog->max_scans);
        err->limit = 1;
        longjmp(err->jump, 1);
    }
}

static void roi_error_exit(j_common_ptr cinfo) {
    struct roi_error *err = (struct roi_error *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    /* the coefficient buffer of a file above max_memory_to_use would need a temporary file */
    if (cinfo->err->msg_code == JERR_NO_BACKING_STORE) err->limit = 1;
    longjmp(err->jump, 1);
}

/* Warnings (level -1: corrupt data that libjpeg would paper over) are errors here, like simplejpeg's
 * strict mode: the sample then goes through the fallback decoder or is reported as unreadable. */
static void roi_emit_message(j_common_ptr cinfo, int level) {
    if (level < 0) roi_error_exit(cinfo);
}

static PyObject *decode_crop(PyObject *self, PyObject *args) {
    Py_buffer data;
    /* The limits' defaults are decode.py's DecodeLimits() defaults. */
    int top, left, height, width, fast, max_scans = 100;
    long long max_pixels = 100000000LL, max_memory = -1;
    if (!PyArg_ParseTuple(args, "y*iiiip|LiL", &data, &top, &left, &height, &width, &fast, &max_pixels,
                          &max_scans, &max_memory))
        return NULL;
    if (max_memory < 0) max_memory = 8 * max_pixels + (64LL << 20);

    struct jpeg_decompress_struct cinfo;
    struct roi_error err;
    struct roi_progress progress;
    PyObject *volatile out = NULL;
    PyThreadState *volatile released = NULL; /* the GIL is released while libjpeg decodes */
    volatile int created = 0;
    JDIMENSION x0 = 0, out_w = 0;

    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = roi_error_exit;
    err.pub.emit_message = roi_emit_message;
    err.message[0] = '\0';
    err.limit = 0;
    /* Before jpeg_create_decompress: it can fail too (out of memory), and its error_exit jumps here. */
    if (setjmp(err.jump)) {
        if (released != NULL) PyEval_RestoreThread(released);
        if (created) jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        Py_XDECREF(out);
        PyErr_Format(err.limit ? LimitError : PyExc_ValueError, "libjpeg: %s", err.message);
        return NULL;
    }
    jpeg_create_decompress(&cinfo);
    created = 1;
    cinfo.mem->max_memory_to_use = (long)max_memory;
    progress.pub.progress_monitor = roi_progress_monitor;
    progress.max_scans = max_scans;
    cinfo.progress = &progress.pub;

    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    if ((long long)cinfo.image_width * cinfo.image_height > max_pixels) {
        snprintf(err.message, sizeof err.message, "%ux%u image is above %lld pixels", cinfo.image_width,
                 cinfo.image_height, max_pixels);
        err.limit = 1;
        longjmp(err.jump, 1);
    }
    if (top < 0 || left < 0 || height <= 0 || width <= 0 || (JDIMENSION)top + height > cinfo.image_height ||
        (JDIMENSION)left + width > cinfo.image_width) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "window (top %d, left %d, %dx%d) outside the %ux%u image", top, left,
                     height, width, cinfo.image_height, cinfo.image_width);
        return NULL;
    }
    cinfo.out_color_space = JCS_RGB;
    if (fast) {
        cinfo.dct_method = JDCT_IFAST;
        cinfo.do_fancy_upsampling = FALSE;
    }
    /* A progressive file's scans are all read here: without the GIL, as the rows below */
    released = PyEval_SaveThread();
    jpeg_start_decompress(&cinfo);
    PyEval_RestoreThread(released);
    released = NULL;
    x0 = (JDIMENSION)left;
    out_w = (JDIMENSION)width;
    jpeg_crop_scanline(&cinfo, &x0, &out_w);
    /* crop_scanline widens the window to the iMCU grid; it never narrows it */
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)height * out_w * 3);
    if (out == NULL) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return NULL;
    }
    unsigned char *dst = (unsigned char *)PyByteArray_AS_STRING(out);
    size_t stride = (size_t)out_w * 3;

    released = PyEval_SaveThread();
    if (top > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)top) != (JDIMENSION)top) {
        strcpy(err.message, "could not skip to the window's first row");
        longjmp(err.jump, 1);
    }
    while (cinfo.output_scanline < (JDIMENSION)(top + height)) {
        /* Several rows per call: fewer calls, and a 2x2-subsampled image's row pairs are upsampled
         * straight into the output instead of through libjpeg's spare-row buffer. */
        JSAMPROW rows[16];
        JDIMENSION n = (JDIMENSION)(top + height) - cinfo.output_scanline;
        if (n > 16) n = 16;
        for (JDIMENSION k = 0; k < n; k++) rows[k] = dst + (size_t)(cinfo.output_scanline - top + k) * stride;
        jpeg_read_scanlines(&cinfo, rows, n);
    }
    /* The rows below the window are not decoded: abort instead of jpeg_finish_decompress. */
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    PyEval_RestoreThread(released);

    PyBuffer_Release(&data);
    PyObject *result = Py_BuildValue("(OII)", out, x0, out_w);
    Py_DECREF(out);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_crop", decode_crop, METH_VARARGS,
     "decode_crop(data, top, left, height, width, fast[, max_pixels, max_scans, max_memory]) -> (bytearray, "
     "x0, out_width): RGB rows "
     "top..top+height-1, iMCU-aligned columns x0..x0+out_width-1 of a JPEG."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpegroi",
                                    "Region-of-interest JPEG decode with libjpeg-turbo.", -1, methods};

PyMODINIT_FUNC PyInit__jpegroi(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    LimitError = PyErr_NewException("imgtrain.data.decode._jpegroi.LimitError", NULL, NULL);
    if (LimitError == NULL || PyModule_AddObjectRef(m, "LimitError", LimitError) < 0 ||
        PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION_NUMBER", LIBJPEG_TURBO_VERSION_NUMBER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Dl_info info;
    const char *path = dladdr((void *)jpeg_std_error, &info) && info.dli_fname ? info.dli_fname : "";
    if (PyModule_AddStringConstant(m, "LIBJPEG_PATH", path) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
