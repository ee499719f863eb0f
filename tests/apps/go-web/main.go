// A web: process on $BIND_ADDRESS:$PORT, standard library only.
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
)

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "go-web v1 %s\n", runtime.Version())
	})
	addr := net.JoinHostPort(os.Getenv("BIND_ADDRESS"), os.Getenv("PORT"))
	if err := http.ListenAndServe(addr, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
