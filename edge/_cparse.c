/* The optional C fast path of edge._codec.Decoder(raw=True): see parse_publishes_doc.
 *
 * It decides nothing the Python decoder would decide differently: it takes only the
 * packets that are certainly well-formed QoS 0/1 PUBLISHes with a topic the Python code
 * has already checked (found in its cache), and stops at the first packet that is
 * anything else, for the Python code to handle with its exact rules and messages. It
 * never raises a protocol error; every read is bounds-checked against the buffer. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

PyDoc_STRVAR(parse_publishes_doc,
"parse_publishes(data, pos, limit, topics, events) -> int\n\n"
"Walk the packets of ``data`` (bytes) from ``pos``; while each is a complete PUBLISH of\n"
"QoS 0 or 1 with legal flags, a remaining length in its shortest form and at most\n"
"``limit``, its topic (and packet id) inside the packet, a topic whose bytes are a key of\n"
"``topics`` (dict: checked topic bytes -> str) and a non-zero packet id for QoS 1, append\n"
"``(topic, payload, pid, first_byte)`` to ``events`` (list). Return the position of the\n"
"first packet not taken (len(data) when all were).");

static PyObject *
parse_publishes(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "parse_publishes takes 5 arguments");
        return NULL;
    }
    PyObject *data = args[0], *topics = args[3], *events = args[4];
    if (!PyBytes_CheckExact(data) || !PyDict_CheckExact(topics) || !PyList_CheckExact(events)) {
        PyErr_SetString(PyExc_TypeError, "parse_publishes(bytes, int, int, dict, list)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (pos < 0)
        pos = n;  /* nothing to take: the Python code sees the same position */

    while (pos < n) {
        unsigned int first = p[pos];
        unsigned int qos = (first >> 1) & 3;
        if ((first & 0xF0) != 0x30 || qos > 1 || (qos == 0 && (first & 8)))
            break;  /* not a PUBLISH, QoS 2 or 3, or DUP on QoS 0 */
        /* remaining length: at most 4 bytes, shortest form (no final 0 after the first) */
        Py_ssize_t i = pos + 1, length = 0;
        int shift = 0, complete = 0;
        while (i < n && shift <= 21) {
            unsigned int byte = p[i++];
            length |= (Py_ssize_t)(byte & 0x7F) << shift;
            if (byte < 0x80) {
                complete = byte != 0 || shift == 0;
                break;
            }
            shift += 7;
        }
        if (!complete || length > limit || length > n - i)
            break;  /* incomplete, malformed or too long: the Python code decides */
        Py_ssize_t end = i + length;
        if (length < 2)
            break;
        Py_ssize_t topic_len = ((Py_ssize_t)p[i] << 8) | p[i + 1];
        Py_ssize_t t_end = i + 2 + topic_len;
        if (t_end > end || (qos && t_end + 2 > end))
            break;
        unsigned int pid = 0;
        if (qos) {
            pid = ((unsigned int)p[t_end] << 8) | p[t_end + 1];
            if (pid == 0)
                break;
            t_end += 2;
        }
        PyObject *key = PyBytes_FromStringAndSize((const char *)p + i + 2, topic_len);
        if (key == NULL)
            return NULL;
        PyObject *topic = PyDict_GetItemWithError(topics, key);  /* borrowed: owned at once */
        Py_XINCREF(topic);
        Py_DECREF(key);
        if (topic == NULL) {
            if (PyErr_Occurred())
                return NULL;
            break;  /* not checked yet: the Python code checks and caches it */
        }
        PyObject *event = PyTuple_New(4);
        if (event == NULL) {
            Py_DECREF(topic);
            return NULL;
        }
        PyTuple_SET_ITEM(event, 0, topic);  /* the tuple owns it now */
        PyObject *item = PyBytes_FromStringAndSize((const char *)p + t_end, end - t_end);
        if (item == NULL)
            goto fail;
        PyTuple_SET_ITEM(event, 1, item);
        if ((item = PyLong_FromLong(pid)) == NULL)
            goto fail;
        PyTuple_SET_ITEM(event, 2, item);
        if ((item = PyLong_FromLong(first)) == NULL)
            goto fail;
        PyTuple_SET_ITEM(event, 3, item);
        if (PyList_Append(events, event) < 0)
            goto fail;
        Py_DECREF(event);
        pos = end;
        continue;
    fail:
        Py_DECREF(event);  /* frees the items set so far (the rest are NULL) */
        return NULL;
    }
    return PyLong_FromSsize_t(pos);
}

static PyMethodDef methods[] = {
    {"parse_publishes", (PyCFunction)(void (*)(void))parse_publishes, METH_FASTCALL, parse_publishes_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "edge._cparse",
    .m_doc = "The optional C fast path of edge._codec.Decoder(raw=True) for QoS 0/1 PUBLISH packets.",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__cparse(void)
{
    return PyModuleDef_Init(&module);
}
