# A web: process on $BIND_ADDRESS:$PORT, standard library only, started through bundler.
require "socket"

server = TCPServer.new(ENV.fetch("BIND_ADDRESS").delete("[]"), Integer(ENV.fetch("PORT")))
loop do
  client = server.accept
  while (line = client.gets) && line != "\r\n"; end
  body = "ruby-web v1 ruby=#{RUBY_VERSION} bundler=#{defined?(Bundler) ? 'yes' : 'no'}\n"
  client.write("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: #{body.bytesize}\r\nConnection: close\r\n\r\n#{body}")
  client.close
end
